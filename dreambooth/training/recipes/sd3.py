"""Stable Diffusion 3.x: an MMDiT transformer over 2x2 patches of the latents (it patches them itself),
conditioned on one sequence, two CLIP encoders' penultimate states side by side and zero-padded to T5's
width, then T5's states; and on both CLIPs' pooled embeddings side by side.

The objective is diffusers' SD3 DreamBooth LoRA example's defaults: a logit-normal timestep (its
`--weighting_scheme logit_normal`, loss weight 1), the sample moved to x_t = (1 - sigma) x + sigma noise
on the shifted schedule, and the transformer's velocity turned into a clean-sample estimate
x_t - sigma v scored against the sample (`--precondition_outputs 1`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dreambooth.training.losses import LossTerms, draw_noise, prior_preservation_loss
from dreambooth.training.recipes.flow import FlowMatchingRecipe, flow_matching_sample

T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length: training sees what inference sees


class StableDiffusion3Recipe(FlowMatchingRecipe):
    family = "sd3"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # the CLIPs, as diffusers' example; T5 stays frozen
    identifier_tokenizers = ("tokenizer", "tokenizer_2")
    methods = ("full", "lora")

    @classmethod
    def image_step(cls, denoiser_config, vae_config) -> int:
        return 2 ** (len(vae_config["block_out_channels"]) - 1) * denoiser_config["patch_size"]

    def _t5_states(self, prompts: list[str]) -> torch.Tensor:
        if self.pipeline.text_encoder_3 is None:  # a model shipped without T5 reads zeros there, as its pipeline does
            return torch.zeros(len(prompts), T5_TOKENS, self.pipeline.transformer.config.joint_attention_dim, device=self.device)
        return self.frozen_t5("text_encoder_3", "tokenizer_3", prompts, T5_TOKENS)

    def encode_prompts(self, modules, prompts):
        hidden, pooled = [], []
        for tokenizer_name, encoder_name in zip(self.identifier_tokenizers, self.trainable_text_encoders):
            output = self.module(modules, encoder_name)(self.token_ids(tokenizer_name, prompts), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # the penultimate layer, as SD3 was trained
            pooled.append(output[0])  # each encoder's projected pooled embedding
        t5 = self._t5_states(prompts)
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"embeddings": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def loss(self, modules, latents, extras, conditioning, num_instance, generator) -> LossTerms:
        noise = draw_noise(latents.shape, generator, self.settings.noise_offset).to(self.device)
        timesteps, sigmas = self.draw_timesteps(latents.shape[0], generator, "logit_normal")
        noisy, _ = flow_matching_sample(latents, noise, sigmas)
        velocity = self.module(modules, self.denoiser)(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=conditioning["embeddings"],
            pooled_projections=conditioning["pooled"], return_dict=False,
        )[0]
        estimate = noisy - sigmas.view(-1, 1, 1, 1).to(velocity.dtype) * velocity  # the clean sample it implies
        return prior_preservation_loss(estimate, latents, num_instance, self.settings.prior_loss_weight,
                                       pixel_weights=self.pixel_weights(extras))
