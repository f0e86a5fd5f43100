"""Flux (FLUX.1-dev layout): a rectified-flow transformer over 2x2-packed latents, conditioned on T5's
token embeddings, CLIP's pooled embedding and a guidance value; LoRA only (12B weights do not fit a
full fine-tune on one GPU).

The objective is diffusers' Flux DreamBooth example's: a timestep drawn uniformly from the scheduler's
training timesteps (weighting scheme "none"), the sample moved along the straight path
x_t = (1 - sigma) x + sigma noise, and the transformer asked for the velocity noise - x.
"""

from __future__ import annotations

import torch

from dreambooth.training.losses import LossTerms, draw_noise, prior_preservation_loss
from dreambooth.training.recipes.flow import FlowMatchingRecipe, flow_matching_sample

FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px with its 8x VAE


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as the transformer reads them: one token per 2x2 patch, (B, H/2 * W/2, 4C)."""
    size, channels, height, width = latents.shape
    patches = latents.view(size, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(size, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """pack_latents undone: tokens back to (B, C, H, W) latents of that height and width."""
    size, _, features = tokens.shape
    patches = tokens.view(size, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(size, features // 4, height, width)


def latent_token_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Each packed token's (0, row, column) position, for the transformer's rotary embedding."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxRecipe(FlowMatchingRecipe):
    family = "flux"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder",)  # CLIP, as diffusers' example; T5 stays frozen
    methods = ("lora",)

    def encode_prompts(self, modules, prompts):
        pooled = self.module(modules, "text_encoder")(self.token_ids("tokenizer", prompts)).pooler_output
        embeddings = self.frozen_t5("text_encoder_2", "tokenizer_2", prompts, self.pipeline.tokenizer_2.model_max_length)
        text_ids = torch.zeros(embeddings.shape[1], 3, device=self.device, dtype=embeddings.dtype)
        return {"embeddings": embeddings, "pooled": pooled, "text_ids": text_ids}

    @classmethod
    def image_step(cls, denoiser_config, vae_config) -> int:
        return 2 ** (len(vae_config["block_out_channels"]) - 1) * 2  # latents are packed in 2x2 patches

    @classmethod
    def native_size(cls, denoiser_config, vae_config) -> int:
        return FLUX_DEFAULT_SAMPLE_SIZE * 2 ** (len(vae_config["block_out_channels"]) - 1)

    def conditioning_rows(self, conditioning, rows):
        # The text tokens' position ids are the same for every prompt.
        return {name: value if name == "text_ids" else value[rows] for name, value in conditioning.items()}

    def loss(self, modules, latents, extras, conditioning, num_instance, generator) -> LossTerms:
        size, channels, height, width = latents.shape
        noise = draw_noise(latents.shape, generator, self.settings.noise_offset)
        _, sigmas = self.draw_timesteps(size, generator)
        noisy, target = flow_matching_sample(latents, noise.to(self.device), sigmas)
        transformer = self.module(modules, self.denoiser)
        guidance = torch.full((size,), self.settings.guidance_scale, device=self.device)
        prediction = transformer(
            hidden_states=pack_latents(noisy),
            timestep=sigmas,
            guidance=guidance if self.pipeline.transformer.config.guidance_embeds else None,
            pooled_projections=conditioning["pooled"],
            encoder_hidden_states=conditioning["embeddings"],
            txt_ids=conditioning["text_ids"],
            img_ids=latent_token_ids(height, width, self.device, latents.dtype),
            return_dict=False,
        )[0]
        prediction = unpack_latents(prediction, height, width)
        return prior_preservation_loss(prediction, target, num_instance, self.settings.prior_loss_weight,
                                       pixel_weights=self.pixel_weights(extras))
