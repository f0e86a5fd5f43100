"""The recipe interface and what most families share: training views encoded once by the frozen VAE,
in groups of one size (a batch never mixes sizes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch

import torch.nn.functional as F

from dreambooth.config import DataSettings, TrainingSettings
from dreambooth.errors import InputError
from dreambooth.models.loading import native_resolution
from dreambooth.training.data import LatentCache, TrainingView, ViewShape, encode_views, training_views
from dreambooth.training.losses import LossTerms, masked_weights


@dataclass
class ViewGroup:
    """The views of one size: their cached latents and, one row per view, what goes beside them."""

    size: tuple[int, int]  # (width, height)
    latents: LatentCache
    captions: list[str]  # "" : the instance prompt
    # By name: "mask" (the loss weights' mask at latent size), "time_ids" (SDXL), "low_res" (the upscaler's input).
    extras: dict[str, torch.Tensor]
    views: list[TrainingView]


@dataclass
class TrainingImages:
    groups: list[ViewGroup]

    def __len__(self) -> int:
        return sum(len(group.latents) for group in self.groups)

    def counts(self) -> dict[tuple[int, int], int]:
        return {group.size: len(group.latents) for group in self.groups}

    def group_of(self, size: tuple[int, int]) -> int:
        return next(index for index, group in enumerate(self.groups) if group.size == size)


def latent_mask(views: list[TrainingView], height: int, width: int) -> torch.Tensor:
    """Each view's mask averaged down to the latent grid, (N, 1, height, width) in [0, 1]; no mask: all ones."""
    masks = torch.ones(len(views), 1, height, width)
    for index, view in enumerate(views):
        if view.mask is not None:
            full = torch.from_numpy(np.asarray(view.mask, dtype=np.float32) / 255.0)[None, None]
            masks[index] = F.adaptive_avg_pool2d(full, (height, width))[0]
    return masks


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
    vae_frames: ClassVar[bool] = False  # a video VAE: images go in as one-frame clips

    def __init__(self, pipeline, settings: TrainingSettings, device: torch.device, resolution: Optional[int] = None,
                 setting: str = "training", data: Optional[DataSettings] = None):
        self.pipeline, self.settings, self.device, self.setting = pipeline, settings, device, setting
        self.training_resolution = resolution or self.resolution()
        self.check_settings(settings, setting)
        self.view_shape = self.shape_of_views(data or DataSettings(buckets=False), settings, self.training_resolution,
                                              getattr(pipeline, self.denoiser).config, pipeline.vae.config)

    @classmethod
    def check_settings(cls, settings: TrainingSettings, setting: str = "training") -> None:
        """InputError when this family cannot train these settings (ingest checks before anything runs)."""
        if settings.method not in cls.methods:
            raise InputError(f"{setting}.method: {settings.method} is not available for {cls.family} models ({', '.join(cls.methods)})")
        if settings.train_text_encoder and not cls.trainable_text_encoders:
            raise InputError(f"{setting}.train_text_encoder: {cls.family} models train with their text encoder frozen")
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

    @classmethod
    def image_step(cls, denoiser_config, vae_config) -> int:
        """Image sides must be multiples of this: the VAE's downscale times the denoiser's own."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1) * 2 ** (len(denoiser_config["block_out_channels"]) - 1)

    @classmethod
    def native_size(cls, denoiser_config, vae_config) -> int:
        """native_resolution, from the config files alone (ingest loads no weights)."""
        return denoiser_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)

    @classmethod
    def shape_of_views(cls, data: DataSettings, settings: TrainingSettings, resolution: int, denoiser_config, vae_config) -> ViewShape:
        """The square, or with data.buckets the aspect-ratio buckets of this model's image step."""
        step = cls.image_step(denoiser_config, vae_config) if data.buckets_for(cls.family) else 0
        return ViewShape(resolution, settings.center_crop, step, data.max_aspect_ratio)

    def module(self, modules: dict, name: str):
        """The module being trained (wrapped for several processes) when it trains, else the pipeline's own."""
        return modules[name] if name in modules else getattr(self.pipeline, name)

    def prepare_images(self, paths: list[Path], buckets: Optional[list[tuple[int, int]]] = None, with_masks: bool = False,
                       flips: Optional[bool] = None) -> TrainingImages:
        """The photos' views, grouped by size and encoded; `buckets`: one per photo instead of each
        photo's own (class images go to the subject's buckets)."""
        views = training_views(paths, self.view_shape, self.settings.random_flip if flips is None else flips, with_masks, buckets)
        sizes = list(dict.fromkeys(view.size for view in views))
        groups = []
        for size in sizes:
            members = [view for view in views if view.size == size]
            latents = encode_views(self.pipeline.vae, [view.image for view in members], self.vae_frames)
            extras = self.view_extras(members, latents)
            if with_masks:
                extras["mask"] = latent_mask(members, *latents.mean.shape[-2:])
            groups.append(ViewGroup(size, latents, [view.caption for view in members], extras, members))
        return TrainingImages(groups)

    def view_extras(self, views: list[TrainingView], latents: LatentCache) -> dict[str, torch.Tensor]:
        """What a family's denoiser needs of each view beside its latents."""
        return {}

    def sample(self, images: TrainingImages, indices: torch.Tensor, generator: torch.Generator, group: int = 0):
        """(scaled latents, extras) of the picked views of one group."""
        config = self.pipeline.vae.config
        views = images.groups[group]
        latents = views.latents.sample(indices, generator, config.scaling_factor, getattr(config, "shift_factor", None) or 0.0)
        return latents, {name: rows[indices] for name, rows in views.extras.items()}

    def conditioning_rows(self, conditioning: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        """The conditioning of the prompts at `rows` of an encoded list (encode_prompts)."""
        return {name: value[rows] for name, value in conditioning.items()}

    def pixel_weights(self, extras: dict) -> Optional[torch.Tensor]:
        """The subject examples' per-pixel loss weights (training.mask_weight); None: unmasked."""
        if not extras or "mask" not in extras or self.settings.mask_weight == 1.0:
            return None
        return masked_weights(extras["mask"], self.settings.mask_weight)

    def encode_prompts(self, modules: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The denoiser's text conditioning, one row per example."""
        raise NotImplementedError

    def loss(self, modules: dict, latents: torch.Tensor, extras: Optional[torch.Tensor], conditioning: dict,
             num_instance: int, generator: torch.Generator) -> LossTerms:
        raise NotImplementedError
