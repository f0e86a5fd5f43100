"""What the flow-matching families (Flux, SD 3.x) share: the straight path from data to noise, their
scheduler, min-SNR refused (it weights a noise-prediction loss), and T5's states, computed once per
prompt list since T5 never trains."""

from __future__ import annotations

import torch

from dreambooth.errors import InputError
from dreambooth.training.recipes.base import Recipe


def flow_matching_sample(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, target): the point at sigma on the straight path from data to noise, and its velocity."""
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - sigmas) * latents + sigmas * noise, noise - latents


class FlowMatchingRecipe(Recipe):
    denoiser = "transformer"

    def __init__(self, pipeline, settings, device, resolution=None, setting: str = "training", data=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipeline, settings, device, resolution, setting, data)
        if settings.snr_gamma is not None:
            raise InputError(f"{setting}.snr_gamma: min-SNR weights a noise-prediction loss; {self.family} trains on flow matching")
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self._t5: dict[tuple[str, ...], torch.Tensor] = {}

    def draw_timesteps(self, size: int, generator: torch.Generator, scheme: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) of `size` examples, drawn from the scheduler's training timesteps by diffusers'
        weighting `scheme` (none: uniform; logit_normal: mean 0, std 1); each sigma is its timestep / 1000,
        the scheduler's own, shift included."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        drawn = compute_density_for_timestep_sampling(scheme, size, logit_mean=0.0, logit_std=1.0, generator=generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = self.noise_scheduler.timesteps[(drawn * steps).long().clamp(max=steps - 1)].to(self.device)
        return timesteps, timesteps / steps

    def frozen_t5(self, encoder_name: str, tokenizer_name: str, prompts: list[str], max_length: int) -> torch.Tensor:
        """T5's last hidden states for the prompts, computed once per prompt list."""
        key = tuple(prompts)
        if key not in self._t5:
            with torch.no_grad():
                self._t5[key] = getattr(self.pipeline, encoder_name)(self.token_ids(tokenizer_name, prompts, max_length))[0]
        return self._t5[key]
