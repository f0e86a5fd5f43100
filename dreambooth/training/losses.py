"""The DreamBooth objective: denoising loss on the subject plus the class-specific prior loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    total: torch.Tensor
    instance: torch.Tensor
    prior: Optional[torch.Tensor] = None

    def as_floats(self) -> dict[str, float]:
        floats = {"loss": self.total.item(), "instance_loss": self.instance.item()}
        if self.prior is not None:
            floats["prior_loss"] = self.prior.item()
        return floats


def prior_preservation_loss(
    prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float
) -> LossTerms:
    """mse(instance) + lambda * mse(prior) (paper eq. 2).

    The batch holds the subject examples first and the frozen model's class examples after
    them; supervising the class examples with the model's own samples keeps the class prior
    (against language drift) while the identifier binds to the subject.
    """
    prediction, target = prediction.float(), target.float()
    instance = F.mse_loss(prediction[:num_instance], target[:num_instance])
    if prediction.shape[0] == num_instance:
        return LossTerms(total=instance, instance=instance)
    prior = F.mse_loss(prediction[num_instance:], target[num_instance:])
    return LossTerms(total=instance + prior_weight * prior, instance=instance, prior=prior)
