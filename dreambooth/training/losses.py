"""The DreamBooth objective: denoising loss on the subject plus the class-specific prior loss.

A batch holds the subject examples first and the class examples after them; `denoising_loss`
noises it, asks the denoiser and scores the prediction against its target (epsilon or v). Flux's
flow-matching objective lives in its recipe and shares `prior_preservation_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    pixel_weights: Optional[torch.Tensor] = None,
) -> LossTerms:
    """mse(instance) + lambda * mse(prior) (paper eq. 2), optionally weighted per example and per pixel.

    The batch holds the subject examples first and the frozen model's class examples after
    them; supervising the class examples with the model's own samples keeps the class prior
    (against language drift) while the identifier binds to the subject. `example_weights` (one
    per example, e.g. min-SNR) scale each example's mean squared error inside its own half.
    `pixel_weights` ((subject examples, 1, H, W), see masked_weights) make each subject example's
    error a weighted mean: with weight 0 outside the subject, the background teaches nothing.
    """
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_example = squared.flatten(1).mean(dim=1)
    if pixel_weights is not None:
        weights = pixel_weights.to(squared.device, squared.dtype).expand_as(squared[:num_instance])
        # Normalised by the weights' sum, so the loss keeps its scale whatever share of the view the subject fills.
        masked = (squared[:num_instance] * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(1e-8)
        per_example = torch.cat([masked, per_example[num_instance:]])
    if example_weights is not None:
        per_example = per_example * example_weights.float().to(per_example.device)
    instance = per_example[:num_instance].mean()
    if prediction.shape[0] == num_instance:
        return LossTerms(total=instance, instance=instance)
    prior = per_example[num_instance:].mean()
    return LossTerms(total=instance + prior_weight * prior, instance=instance, prior=prior)


def masked_weights(mask: torch.Tensor, outside_weight: float) -> torch.Tensor:
    """Per-pixel loss weights from a [0, 1] mask: 1 on the subject, `outside_weight` elsewhere (training.mask_weight)."""
    return outside_weight + (1.0 - outside_weight) * mask


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


def draw_noise(shape, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise; `noise_offset` adds a per-example, per-channel constant, so the model also learns
    to change an image's overall brightness (very dark or light images)."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


@dataclass
class DenoisingBatch:
    """One training batch: subject examples first, then class examples."""

    latents: torch.Tensor  # scaled by the VAE's scaling factor
    noise: torch.Tensor
    timesteps: torch.Tensor
    embeddings: torch.Tensor  # text-encoder hidden states, one row per example
    num_instance: int
    # Channels concatenated to the noisy latents (the upscaler's noised low-resolution image).
    condition: Optional[torch.Tensor] = None
    # More conditioning the denoiser takes by keyword: the upscaler's noise level, SDXL's pooled text and time ids.
    denoiser_kwargs: dict = field(default_factory=dict)

    @classmethod
    def draw(
        cls, latents, embeddings, num_instance: int, generator, num_train_timesteps: int, device,
        noise_offset: float = 0.0, **conditioning,
    ):
        """Fresh noise (see `draw_noise`) and a uniform timestep per example, from the step's generator."""
        noise = draw_noise(latents.shape, generator, noise_offset)
        return cls(
            latents=latents,
            noise=noise.to(device),
            timesteps=torch.randint(num_train_timesteps, (latents.shape[0],), generator=generator).to(device),
            embeddings=embeddings,
            num_instance=num_instance,
            **conditioning,
        )


def denoising_loss(
    unet, noise_scheduler, batch: DenoisingBatch, prior_weight: float, snr_gamma: Optional[float] = None,
    pixel_weights: Optional[torch.Tensor] = None,
) -> LossTerms:
    """Noise the latents at their timesteps, predict, and apply the prior-preservation loss
    (min-SNR weighted per example when `snr_gamma` is set, per pixel of the subject examples with `pixel_weights`)."""
    noisy = noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    if batch.condition is not None:
        noisy = torch.cat([noisy, batch.condition], dim=1)
    prediction = unet(noisy, batch.timesteps, batch.embeddings, **batch.denoiser_kwargs).sample
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"  # SD 2.x 768 px models
    target = noise_scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps) if v_prediction else batch.noise
    weights = None
    if snr_gamma is not None:
        weights = min_snr_weights(noise_scheduler.alphas_cumprod, batch.timesteps, snr_gamma, v_prediction)
    return prior_preservation_loss(prediction, target, batch.num_instance, prior_weight, weights, pixel_weights)
