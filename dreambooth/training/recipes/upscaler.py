"""The x4 upscaler (personalised super-resolution, paper sec. 4.2): a UNet that takes the noisy latents
with the low-resolution image concatenated as 3 more channels, that image noised by the low-res
scheduler at a noise level which also goes in as the UNet's class label.

Training pairs are each view at the target size and the same view 4x smaller; the level is drawn per
example from a low range (superres.train_noise_levels), so the model learns to keep the detail a
nearly clean condition carries instead of inventing texture.
"""

from __future__ import annotations

import torch
from PIL import Image

from dreambooth.errors import InputError
from dreambooth.training.data import pixels
from dreambooth.training.recipes.sd import StableDiffusionRecipe

UPSCALE_FACTOR = 4


def low_resolution(views: list[Image.Image]) -> torch.Tensor:
    """The upscaler's condition: each view 4x smaller (bicubic), in [-1, 1]."""
    return pixels([view.resize((view.width // UPSCALE_FACTOR, view.height // UPSCALE_FACTOR), Image.Resampling.BICUBIC) for view in views])


def noised_condition(low_res: torch.Tensor, noise: torch.Tensor, noise_levels: torch.Tensor, low_res_scheduler) -> torch.Tensor:
    """Noise augmentation of the condition, exactly as StableDiffusionUpscalePipeline applies it."""
    return low_res_scheduler.add_noise(low_res, noise, noise_levels)


def draw_noise_levels(count: int, levels: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    low, high = levels
    return torch.randint(low, high + 1, (count,), generator=generator)


class UpscalerRecipe(StableDiffusionRecipe):
    family = "sd-upscaler"
    single_file_export = False
    methods = ("full",)

    def __init__(self, pipeline, settings, device, resolution=None, setting: str = "superres.training",
                 noise_levels: tuple[int, int] = (0, 8)):
        super().__init__(pipeline, settings, device, resolution, setting)
        if noise_levels[1] > pipeline.config.max_noise_level:
            raise InputError(
                f"superres.train_noise_levels: {noise_levels[1]} exceeds the upscaler's max_noise_level {pipeline.config.max_noise_level}"
            )
        self.noise_levels = noise_levels

    def view_extras(self, views, latents):
        return {"low_res": low_resolution([view.image for view in views])}

    def batch_condition(self, extras, conditioning, generator):
        low_res = extras["low_res"]
        levels = draw_noise_levels(low_res.shape[0], self.noise_levels, generator)
        condition = noised_condition(low_res, torch.randn(low_res.shape, generator=generator), levels, self.pipeline.low_res_scheduler)
        return condition.to(self.device), {"class_labels": levels.to(self.device)}
