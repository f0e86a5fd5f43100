"""SDXL: two CLIP text encoders whose penultimate hidden states are concatenated, and a UNet that also
takes the second encoder's pooled embedding and six size/crop "time ids"."""

from __future__ import annotations

import torch

from dreambooth.training.data import TrainingView
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
        return {"embeddings": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def view_extras(self, views, latents):
        return {"time_ids": torch.tensor([time_ids(view) for view in views], dtype=torch.float32)}

    def batch_condition(self, extras, conditioning, generator):
        time_ids = extras["time_ids"].to(self.device, conditioning["text_embeds"].dtype)
        return None, {"added_cond_kwargs": {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids}}


def time_ids(view: TrainingView) -> list[int]:
    """SDXL's six size and crop conditioning values of a view: the photo's (height, width), the crop's
    (top, left) in the resized photo, and the view's (height, width), as SDXL was trained."""
    width, height = view.original_size
    top, left = view.placement.crop_top_left
    return [height, width, top, left, view.size[1], view.size[0]]
