"""Z-Image: a single-stream transformer that patchifies the latents itself, conditioned on a Qwen3
model's second-to-last hidden states, the prompt's own tokens only (no padding), the prompt wrapped in
Qwen's chat template. LoRA only; the text encoder stays frozen, as in diffusers' Z-Image DreamBooth
LoRA example.

The objective is that example's: the VAE's mean, shifted and scaled; a timestep drawn uniformly from
the scheduler's training timesteps (weighting scheme "none"); x_t = (1 - sigma) x + sigma noise. The
transformer reads 1 - t/1000 as its time and predicts x - noise, so the velocity is its output negated,
scored against noise - x.
"""

from __future__ import annotations

import torch

from dreambooth.models.loading import DEFAULT_TRANSFORMER_SIDE
from dreambooth.training.losses import LossTerms, draw_noise, prior_preservation_loss
from dreambooth.training.recipes.flow import FlowMatchingRecipe, flow_matching_sample

TEXT_TOKENS = 512  # ZImagePipeline's max_sequence_length


class ZImageRecipe(FlowMatchingRecipe):
    family = "z-image"
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ()  # a 4B language model: frozen, its states computed once per prompt
    methods = ("lora",)

    @classmethod
    def image_step(cls, denoiser_config, vae_config) -> int:
        return 2 ** (len(vae_config["block_out_channels"]) - 1) * max(denoiser_config["all_patch_size"])

    @classmethod
    def native_size(cls, denoiser_config, vae_config) -> int:
        return DEFAULT_TRANSFORMER_SIDE  # what ZImagePipeline draws unless told

    def encode_prompts(self, modules, prompts):
        tokenizer = self.pipeline.tokenizer
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True) for prompt in prompts]
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=TEXT_TOKENS, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device).bool()
        states = self.module(modules, "text_encoder")(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                                                       output_hidden_states=True).hidden_states[-2]
        # Padded rows and each row's length: the transformer reads each prompt's own tokens only.
        return {"embeddings": states * mask[..., None], "lengths": mask.sum(dim=1)}

    def sample(self, images, indices, generator, group=0):
        # The VAE's mean, not a draw from it, as diffusers' example encodes.
        views, config = images.groups[group], self.pipeline.vae.config
        latents = (views.latents.mean[indices] - config.shift_factor) * config.scaling_factor
        return latents, {name: rows[indices] for name, rows in views.extras.items()}

    def loss(self, modules, latents, extras, conditioning, num_instance, generator) -> LossTerms:
        noise = draw_noise(latents.shape, generator, self.settings.noise_offset).to(self.device)
        _, sigmas = self.draw_timesteps(latents.shape[0], generator)
        noisy, target = flow_matching_sample(latents, noise, sigmas)
        captions = [row[:length] for row, length in zip(conditioning["embeddings"], conditioning["lengths"].tolist())]
        outputs = self.module(modules, self.denoiser)(list(noisy.unsqueeze(2).unbind(0)), 1 - sigmas, captions,
                                                      return_dict=False)[0]
        velocity = -torch.stack(outputs).squeeze(2)
        return prior_preservation_loss(velocity, target, num_instance, self.settings.prior_loss_weight,
                                       pixel_weights=self.pixel_weights(extras))
