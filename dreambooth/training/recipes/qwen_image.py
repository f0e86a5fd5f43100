"""Qwen-Image: an MMDiT over 2x2-packed latents of a causal 3D VAE (one frame), normalised per channel by
the VAE's latents_mean and latents_std, conditioned on a Qwen2.5-VL model's last hidden states of the
prompt's own tokens, the prompt set in the pipeline's system template whose tokens are then dropped.
LoRA only; the text encoder stays frozen, as in diffusers' Qwen-Image DreamBooth LoRA example.

The objective is that example's: a draw from the VAE's distribution, a timestep drawn uniformly from the
scheduler's training timesteps (weighting scheme "none"), x_t = (1 - sigma) x + sigma noise, and the
transformer asked for the velocity noise - x.
"""

from __future__ import annotations

import torch

from dreambooth.training.losses import LossTerms, draw_noise, prior_preservation_loss
from dreambooth.training.recipes.flow import FlowMatchingRecipe, flow_matching_sample
from dreambooth.training.recipes.flux import pack_latents, unpack_latents

TEXT_TOKENS = 1024  # QwenImagePipeline's tokenizer_max_length: the prompt's tokens after the template's


class QwenImageRecipe(FlowMatchingRecipe):
    family = "qwen-image"
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ()  # a 7B vision-language model: frozen, its states computed once per prompt
    methods = ("lora",)
    vae_frames = True  # the VAE reads (B, C, frames, H, W)

    @classmethod
    def image_step(cls, denoiser_config, vae_config) -> int:
        return 2 ** len(vae_config["temperal_downsample"]) * denoiser_config["patch_size"]

    @classmethod
    def native_size(cls, denoiser_config, vae_config) -> int:
        return 128 * 2 ** len(vae_config["temperal_downsample"])  # QwenImagePipeline.default_sample_size x its VAE scale

    def encode_prompts(self, modules, prompts):
        pipeline = self.pipeline
        skip = pipeline.prompt_template_encode_start_idx  # the system template's tokens
        tokens = pipeline.tokenizer([pipeline.prompt_template_encode.format(prompt) for prompt in prompts], padding=True,
                                    truncation=True, max_length=TEXT_TOKENS + skip, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device).bool()
        states = self.module(modules, "text_encoder")(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                                                       output_hidden_states=True).hidden_states[-1]
        own = [row[keep][skip:] for row, keep in zip(states, mask)]  # each prompt's tokens after the template's
        longest = max(len(row) for row in own)
        embeddings = torch.stack([torch.cat([row, row.new_zeros(longest - len(row), row.shape[1])]) for row in own])
        lengths = torch.tensor([len(row) for row in own], device=self.device)
        return {"embeddings": embeddings, "mask": (torch.arange(longest, device=self.device) < lengths[:, None]).long()}

    def sample(self, images, indices, generator, group=0):
        # A draw from the VAE's distribution, normalised per channel as the pipeline un-normalises.
        views, config = images.groups[group], self.pipeline.vae.config
        latents = views.latents.sample(indices, generator, 1.0)
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) / std, {name: rows[indices] for name, rows in views.extras.items()}

    def loss(self, modules, latents, extras, conditioning, num_instance, generator) -> LossTerms:
        size, _, height, width = latents.shape
        noise = draw_noise(latents.shape, generator, self.settings.noise_offset).to(self.device)
        _, sigmas = self.draw_timesteps(size, generator)
        noisy, target = flow_matching_sample(latents, noise, sigmas)
        prediction = self.module(modules, self.denoiser)(
            hidden_states=pack_latents(noisy), timestep=sigmas,
            encoder_hidden_states=conditioning["embeddings"], encoder_hidden_states_mask=conditioning["mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * size, return_dict=False,
        )[0]
        return prior_preservation_loss(unpack_latents(prediction, height, width), target, num_instance,
                                       self.settings.prior_loss_weight, pixel_weights=self.pixel_weights(extras))
