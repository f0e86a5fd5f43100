"""SDXL: two CLIP text encoders whose penultimate hidden states are concatenated, and a UNet that also
takes the second encoder's pooled embedding and six size/crop "time ids"."""

from __future__ import annotations

import torch

from dreambooth.training.recipes.sd import StableDiffusionRecipe


class StableDiffusionXLRecipe(StableDiffusionRecipe):
    family = "sdxl"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    identifier_tokenizers = ("tokenizer", "tokenizer_2")

    def encode_prompts(self, modules, prompts):
        hidden, pooled = [], None
        for tokenizer_name, encoder_name in zip(("tokenizer", "tokenizer_2"), self.text_encoders):
            output = self.module(modules, encoder_name)(self.token_ids(tokenizer_name, prompts), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # the penultimate layer, as SDXL was trained
            pooled = output[0]  # the second encoder's projected pooled embedding
        # (original size, crop top-left, target size): views are resized and cropped to the training size.
        size = self.training_resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), dtype=pooled.dtype, device=self.device)
        return {"embeddings": torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}

    def batch_condition(self, extras, conditioning, generator):
        return None, {"added_cond_kwargs": {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}}
