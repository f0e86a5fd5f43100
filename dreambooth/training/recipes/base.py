"""The recipe interface and what most families share: training views encoded once by the frozen VAE."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch

from dreambooth.config import TrainingSettings
from dreambooth.errors import InputError
from dreambooth.models import native_resolution
from dreambooth.training.data import LatentCache, encode_views, training_views
from dreambooth.training.losses import LossTerms


@dataclass
class TrainingImages:
    latents: LatentCache
    extras: Optional[torch.Tensor] = None  # one row per view beside its latents, e.g. the upscaler's low-res input


def tokenize(tokenizer, prompts: list[str], max_length: Optional[int] = None) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class Recipe:
    family: ClassVar[str]
    denoiser: ClassVar[str] = "unet"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # every text encoder of the pipeline
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # those training.train_text_encoder trains
    identifier_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)  # CLIP tokenizers the identifier is one token of
    methods: ClassVar[tuple[str, ...]] = ("full", "lora", "textual_inversion", "pivotal")
    single_file_export: ClassVar[bool] = False  # the kohya layout web UIs load

    def __init__(self, pipeline, settings: TrainingSettings, device: torch.device, resolution: Optional[int] = None,
                 setting: str = "training"):
        self.pipeline, self.settings, self.device, self.setting = pipeline, settings, device, setting
        self.training_resolution = resolution or self.resolution()
        self.check_settings(settings, setting)

    @classmethod
    def check_settings(cls, settings: TrainingSettings, setting: str = "training") -> None:
        """InputError when this family cannot train these settings (ingest checks before anything runs)."""
        if settings.method not in cls.methods:
            raise InputError(f"{setting}.method: {settings.method} is not available for {cls.family} models ({', '.join(cls.methods)})")
        if settings.trains_adapter and settings.lora.export_single_file and not cls.single_file_export:
            raise InputError(f"{setting}.lora.export_single_file: the kohya single-file layout is written for sd and sdxl models only")

    @property
    def embedding_encoders(self) -> tuple[tuple[str, str], ...]:
        """(tokenizer, text encoder) pairs a learned token is added to: where the identifier lives."""
        return tuple(zip(self.identifier_tokenizers, self.trainable_text_encoders))

    def token_ids(self, tokenizer_name: str, prompts: list[str], max_length: Optional[int] = None) -> torch.Tensor:
        """The prompts as the tokenizer's ids on the device; a learned token of several vectors, written
        once in a prompt, is spelt out as diffusers' pipelines do (`<tok> <tok>_1 ...`)."""
        tokenizer = getattr(self.pipeline, tokenizer_name)
        convert = getattr(self.pipeline, "maybe_convert_prompt", None)
        return tokenize(tokenizer, convert(prompts, tokenizer) if convert else prompts, max_length).to(self.device)

    def resolution(self) -> int:
        return native_resolution(self.pipeline)

    def module(self, modules: dict, name: str):
        """The module being trained (wrapped for several processes) when it trains, else the pipeline's own."""
        return modules[name] if name in modules else getattr(self.pipeline, name)

    def prepare_images(self, paths: list[Path]) -> TrainingImages:
        views = training_views(paths, self.training_resolution, self.settings.center_crop, self.settings.random_flip)
        return TrainingImages(encode_views(self.pipeline.vae, views))

    def sample(self, images: TrainingImages, indices: torch.Tensor, generator: torch.Generator):
        """(scaled latents, extras) of the picked views."""
        config = self.pipeline.vae.config
        latents = images.latents.sample(indices, generator, config.scaling_factor, getattr(config, "shift_factor", None) or 0.0)
        return latents, None if images.extras is None else images.extras[indices]

    def encode_prompts(self, modules: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The denoiser's text conditioning, one row per example."""
        raise NotImplementedError

    def loss(self, modules: dict, latents: torch.Tensor, extras: Optional[torch.Tensor], conditioning: dict,
             num_instance: int, generator: torch.Generator) -> LossTerms:
        raise NotImplementedError
