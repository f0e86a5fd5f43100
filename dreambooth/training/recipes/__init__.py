"""Recipes: what one model family needs from the fine-tune driver, and nothing else.

A recipe says which module denoises and which text encoders may train, how images become training
latents, how prompts become the denoiser's conditioning, and how one batch is noised, predicted and
scored. The driver (dreambooth.training.driver) owns the rest for every family and method. Adding a
family means adding a recipe here and a tiny model in dreambooth.models.tiny.
"""

from __future__ import annotations

from dreambooth.errors import InputError
from dreambooth.training.recipes.base import Recipe
from dreambooth.training.recipes.flux import FluxRecipe
from dreambooth.training.recipes.flux2 import Flux2KleinRecipe, Flux2Recipe
from dreambooth.training.recipes.qwen_image import QwenImageRecipe
from dreambooth.training.recipes.sd import StableDiffusionRecipe
from dreambooth.training.recipes.sd3 import StableDiffusion3Recipe
from dreambooth.training.recipes.sdxl import StableDiffusionXLRecipe
from dreambooth.training.recipes.upscaler import UpscalerRecipe
from dreambooth.training.recipes.z_image import ZImageRecipe

RECIPES: dict[str, type[Recipe]] = {
    recipe.family: recipe
    for recipe in (StableDiffusionRecipe, StableDiffusionXLRecipe, StableDiffusion3Recipe, FluxRecipe, Flux2KleinRecipe, Flux2Recipe,
                   ZImageRecipe, QwenImageRecipe, UpscalerRecipe)
}


def recipe_class(family: str) -> type[Recipe]:
    if family not in RECIPES:
        raise InputError(f"model.family: no training recipe for {family!r} (known: {', '.join(RECIPES)})")
    return RECIPES[family]


__all__ = ["RECIPES", "Recipe", "recipe_class"]
