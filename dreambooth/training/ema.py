"""An exponential moving average of the trained weights (training.ema).

The average smooths the last steps' noise out of a short fine-tune; it covers exactly what the
optimizer trains (every denoiser weight, the adapters, a learned embedding), is kept in float32 in
each checkpoint (a resumed run goes on averaging where it stopped), and replaces the raw weights in
what is saved, snapshotted and evaluated.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from dreambooth.config import EmaSettings


class WeightAverage:
    def __init__(self, parameters: list[torch.nn.Parameter], settings: EmaSettings):
        self.parameters, self.settings = parameters, settings
        self.shadow = [parameter.detach().float().clone() for parameter in parameters]
        self.updates = 0

    def decay(self) -> float:
        # Warm-up: early on the average follows the weights closely, or it would stay near where it began.
        return min(self.settings.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After the optimizer's update of `step`: before start_step the average is the weights themselves."""
        if step <= self.settings.start_step:
            for shadow, parameter in zip(self.shadow, self.parameters):
                shadow.copy_(parameter.detach().float())
            return
        weight = 1.0 - self.decay()
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.lerp_(parameter.detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to_weights(self) -> None:
        for shadow, parameter in zip(self.shadow, self.parameters):
            parameter.copy_(shadow.to(parameter.dtype))

    @contextmanager
    def in_weights(self) -> Iterator[None]:
        """The average in the weights for a while (a snapshot), the raw weights back after."""
        raw = [parameter.detach().clone() for parameter in self.parameters]
        self.copy_to_weights()
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, raw):
                    parameter.copy_(value)

    # accelerate saves and restores registered objects with the checkpoint through these two.
    def state_dict(self) -> dict:
        return {"shadow": [tensor.cpu() for tensor in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [tensor.to(parameter.device) for tensor, parameter in zip(state["shadow"], self.parameters)]
        self.updates = state["updates"]
