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
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_instance: int,
    prior_weight: float,
    example_weights: Optional[torch.Tensor] = None,
) -> LossTerms:
    """mse(instance) + lambda * mse(prior) (paper eq. 2), optionally weighted per example.

    The batch holds the subject examples first and the frozen model's class examples after
    them; supervising the class examples with the model's own samples keeps the class prior
    (against language drift) while the identifier binds to the subject. `example_weights` (one
    per example, e.g. min-SNR) scale each example's mean squared error inside its own half.
    """
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if example_weights is not None:
        per_example = per_example * example_weights.float().to(per_example.device)
    instance = per_example[:num_instance].mean()
    if prediction.shape[0] == num_instance:
        return LossTerms(total=instance, instance=instance)
    prior = per_example[num_instance:].mean()
    return LossTerms(total=instance + prior_weight * prior, instance=instance, prior=prior)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., 2023), one per example from that example's own timestep.

    SNR(t) = abar_t / (1 - abar_t); the epsilon loss is weighted min(SNR, gamma) / SNR, the
    v loss min(SNR, gamma) / (SNR + 1). Per example, so with prior preservation the subject and
    class halves are each weighted by their own timesteps (diffusers' reference script computes
    the weights over the whole batch and applies them to the subject half only).
    """
    abar = alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = abar / (1.0 - abar)
    clipped = torch.clamp(snr, max=gamma)
    return (clipped / (snr + 1.0) if v_prediction else clipped / snr).float()
