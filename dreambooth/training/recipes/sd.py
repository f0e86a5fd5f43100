"""Stable Diffusion 1.x / 2.x: a UNet conditioned on one CLIP text encoder's last hidden states;
DDPM noise, epsilon or v-prediction target (SD 2.x 768 px models predict v)."""

from __future__ import annotations

from typing import Optional

import torch

from dreambooth.training.losses import DenoisingBatch, LossTerms, denoising_loss
from dreambooth.training.recipes.base import Recipe


class StableDiffusionRecipe(Recipe):
    family = "sd"
    single_file_export = True

    def __init__(self, pipeline, settings, device, resolution=None, setting: str = "training", data=None):
        from diffusers import DDPMScheduler

        super().__init__(pipeline, settings, device, resolution, setting, data)
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    def encode_prompts(self, modules, prompts):
        return {"embeddings": self.module(modules, "text_encoder")(self.token_ids("tokenizer", prompts))[0]}

    def batch_condition(self, extras, conditioning: dict, generator) -> tuple[Optional[torch.Tensor], dict]:
        """What the denoiser gets beside the noisy latents and the text: (channels concatenated to its input, keywords)."""
        return None, {}

    def loss(self, modules, latents, extras, conditioning, num_instance, generator) -> LossTerms:
        condition, denoiser_kwargs = self.batch_condition(extras, conditioning, generator)
        batch = DenoisingBatch.draw(
            latents, conditioning["embeddings"], num_instance, generator, self.noise_scheduler.config.num_train_timesteps,
            self.device, self.settings.noise_offset, condition=condition, denoiser_kwargs=denoiser_kwargs,
        )
        return denoising_loss(self.module(modules, self.denoiser), self.noise_scheduler, batch, self.settings.prior_loss_weight,
                              self.settings.snr_gamma, self.pixel_weights(extras))
