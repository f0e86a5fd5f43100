"""The FLUX.2 family: rectified-flow transformers conditioned on a language model's hidden states (three
layers side by side), over latents that the Flux.2 VAE's batch norm whitens after 2x2 patchifying. LoRA
only; the text encoder stays frozen, as in diffusers' Flux.2 DreamBooth examples.

- FLUX.2 [klein] (Flux2KleinRecipe): Qwen3's states 9/18/27 of the prompt as one user turn of Qwen's chat
  template; no guidance embedding (guidance is classifier-free at sampling).
- FLUX.2 [dev] (Flux2Recipe): Mistral Small 3's states 10/20/30 of the prompt after the pipeline's system
  message; guidance-distilled, so the transformer is given the guidance scale (training.guidance_scale,
  3.5 in the example) as an input.

The objective is the examples': the VAE's mean (not a draw from it), a timestep drawn uniformly from
the scheduler's training timesteps (weighting scheme "none"), x_t = (1 - sigma) x + sigma noise, and
the transformer asked for the velocity noise - x.

The text layers are the pipelines' (klein's example defaults to dev's 10/20/30, states its pipeline
never reads at inference), so training sees what sampling sees.
"""

from __future__ import annotations

import torch

from dreambooth.training.losses import LossTerms, draw_noise, prior_preservation_loss
from dreambooth.training.recipes.flow import FlowMatchingRecipe, flow_matching_sample

TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
DEV_TEXT_LAYERS = (10, 20, 30)  # Flux2Pipeline's
TEXT_TOKENS = 512  # its max_sequence_length
KLEIN_DEFAULT_SAMPLE_SIZE = 128  # Flux2KleinPipeline.default_sample_size: 1024 px with its 8x VAE


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch's values as channels, in the pipeline's order."""
    size, channels, height, width = latents.shape
    patches = latents.view(size, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(size, channels * 4, height // 2, width // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """patchify undone."""
    size, channels, height, width = latents.shape
    patches = latents.view(size, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(size, channels // 4, height * 2, width * 2)


def position_ids(size: int, time: int, height: int, width: int, length: int, device) -> torch.Tensor:
    """(size, tokens, 4) rotary positions (t, h, w, l) of a time x height x width x length grid."""
    axes = [torch.arange(count) for count in (time, height, width, length)]
    return torch.cartesian_prod(*axes).unsqueeze(0).expand(size, -1, -1).to(device)


class Flux2KleinRecipe(FlowMatchingRecipe):
    family = "flux2-klein"
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ()  # a 4-8B language model: frozen, its states computed once per prompt
    methods = ("lora",)

    @classmethod
    def image_step(cls, denoiser_config, vae_config) -> int:
        return 2 ** (len(vae_config["block_out_channels"]) - 1) * 2  # latents are patchified 2x2

    @classmethod
    def native_size(cls, denoiser_config, vae_config) -> int:
        return KLEIN_DEFAULT_SAMPLE_SIZE * 2 ** (len(vae_config["block_out_channels"]) - 1)

    def chat_token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of each prompt as the one user turn of a chat, thinking off, padded to TEXT_TOKENS."""
        tokenizer = self.pipeline.tokenizer
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False) for prompt in prompts]
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=TEXT_TOKENS, return_tensors="pt")
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    text_layers = TEXT_LAYERS

    def encode_prompts(self, modules, prompts):
        ids, mask = self.chat_token_ids(prompts)
        output = self.module(modules, "text_encoder")(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        layers = torch.stack([output.hidden_states[index] for index in self.text_layers], dim=2)  # (B, L, 3, D)
        embeddings = layers.reshape(*layers.shape[:2], -1)  # the three layers' states side by side per token
        return {"embeddings": embeddings, "text_ids": position_ids(len(prompts), 1, 1, 1, embeddings.shape[1], self.device)}

    def sample(self, images, indices, generator, group=0):
        # The VAE's mean, patchified and whitened by its batch norm's running statistics, as the pipeline encodes.
        views = images.groups[group]
        bn = self.pipeline.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.pipeline.vae.config.batch_norm_eps)
        latents = (patchify(views.latents.mean[indices]) - mean.to(views.latents.mean.device)) / std.to(views.latents.mean.device)
        return latents, {name: rows[indices] for name, rows in views.extras.items()}

    def loss(self, modules, latents, extras, conditioning, num_instance, generator) -> LossTerms:
        size, _, height, width = latents.shape
        noise = draw_noise(latents.shape, generator, self.settings.noise_offset).to(self.device)
        _, sigmas = self.draw_timesteps(size, generator)
        noisy, target = flow_matching_sample(latents, noise, sigmas)
        transformer = self.module(modules, self.denoiser)
        guidance = torch.full((size,), self.settings.guidance_scale, device=self.device)
        prediction = transformer(
            hidden_states=noisy.flatten(2).transpose(1, 2),  # one token per patchified position
            timestep=sigmas,
            guidance=guidance if self.pipeline.transformer.config.guidance_embeds else None,
            encoder_hidden_states=conditioning["embeddings"],
            txt_ids=conditioning["text_ids"],
            img_ids=position_ids(size, 1, height, width, 1, self.device),
            return_dict=False,
        )[0]
        prediction = prediction.transpose(1, 2).reshape(latents.shape)
        # Scored back at the VAE's latent size (the same squared errors, reordered) so a mask lines up.
        return prior_preservation_loss(unpatchify(prediction), unpatchify(target), num_instance, self.settings.prior_loss_weight,
                                       pixel_weights=self.pixel_weights(extras))


class Flux2Recipe(Flux2KleinRecipe):
    """FLUX.2 [dev]: klein's objective with Mistral Small 3's states and the guidance embedding (the
    loss passes training.guidance_scale whenever the transformer has one)."""

    family = "flux2"
    text_layers = DEV_TEXT_LAYERS

    def chat_token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of each prompt after the pipeline's system message, as text blocks of a
        chat with no generation prompt, padded to TEXT_TOKENS."""
        chats = [[{"role": "system", "content": [{"type": "text", "text": self.pipeline.system_message}]},
                  {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}] for prompt in prompts]
        tokens = self.pipeline.tokenizer.apply_chat_template(chats, add_generation_prompt=False, tokenize=True, return_dict=True,
                                                             return_tensors="pt", padding="max_length", truncation=True,
                                                             max_length=TEXT_TOKENS)
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
