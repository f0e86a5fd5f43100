"""Training data, prepared once: each image's training views (with their caption, mask and where
they were cut from the photo), their cached VAE latent distributions, and the fingerprint that names
a run's checkpoint folder. A photo's caption and mask are files beside it (NAME.txt, NAME.mask.png)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from dreambooth.config import RunConfig
from dreambooth.images import MASK_SUFFIX, list_images, load_rgb
from dreambooth.training.buckets import Placement, bucket_sizes, nearest_bucket, place

VAE_ENCODE_BATCH = 8


@dataclass
class LatentCache:
    """Per-image latent distributions (mean, std), unscaled, one row per image view."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, indices: torch.Tensor, generator: torch.Generator, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
        # A fresh draw from the cached distribution each step, as encoding anew would give.
        mean, std = self.mean[indices], self.std[indices]
        eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return (mean + std * eps - shift_factor) * scaling_factor

    def __len__(self) -> int:
        return self.mean.shape[0]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@dataclass(frozen=True)
class ViewShape:
    """Where views are cut: the square of `resolution`, or with `bucket_step` the aspect-ratio bucket
    nearest each photo (training.buckets)."""

    resolution: int
    center_crop: bool = True
    bucket_step: int = 0  # 0: one square bucket
    max_aspect_ratio: float = 2.0

    def buckets(self) -> list[tuple[int, int]]:
        if not self.bucket_step:
            return [(self.resolution, self.resolution)]
        return bucket_sizes(self.resolution, self.bucket_step, self.max_aspect_ratio)

    def placement(self, size: tuple[int, int], bucket: Optional[tuple[int, int]] = None) -> Placement:
        return place(size, bucket or nearest_bucket(size, self.buckets()), self.center_crop)


@dataclass
class TrainingView:
    """One photo as it trains."""

    image: Image.Image  # at its bucket's size
    original_size: tuple[int, int]  # (width, height) of the photo
    placement: Placement  # how the photo was resized and cropped (SDXL's size and crop conditioning)
    caption: str = ""  # "": the subject's instance prompt
    mask: Optional[Image.Image] = None  # "L", white on the subject; None: all subject

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def caption_file(image: Path) -> Path:
    return image.with_suffix(".txt")


def mask_file(image: Path) -> Path:
    return image.with_name(f"{image.stem}{MASK_SUFFIX}")


def read_caption(image: Path) -> str:
    path = caption_file(image)
    return " ".join(path.read_text().split()) if path.is_file() else ""


def view_of(path: Path, shape: ViewShape, bucket: Optional[tuple[int, int]] = None, with_mask: bool = False) -> TrainingView:
    """The photo at `path` placed in its (or the given) bucket, with its caption and, when asked, its mask."""
    image = load_rgb(path, max_pixels=1 << 40).image
    placement = shape.placement(image.size, bucket)
    mask = None
    if with_mask and mask_file(path).is_file():
        mask = placement.apply(Image.open(mask_file(path)).convert("L").resize(image.size, Image.Resampling.NEAREST))
    return TrainingView(placement.apply(image), image.size, placement, read_caption(path), mask)


def mirrored(view: TrainingView) -> TrainingView:
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    return TrainingView(view.image.transpose(flip), view.original_size, view.placement.mirrored(), view.caption,
                        view.mask.transpose(flip) if view.mask is not None else None)


def training_views(images: list[Path], shape: ViewShape, with_flips: bool, with_masks: bool = False,
                   buckets: Optional[list[tuple[int, int]]] = None) -> list[TrainingView]:
    """Each image as a view of its bucket (or of buckets[i]), followed by its mirror when random flips are on."""
    views = []
    for index, path in enumerate(images):
        view = view_of(path, shape, buckets[index] if buckets else None, with_masks)
        views.append(view)
        if with_flips:
            views.append(mirrored(view))
    return views


def pixels(views: list[Image.Image]) -> torch.Tensor:
    return torch.stack([_to_tensor(view) for view in views])


@torch.no_grad()
def encode_views(vae, views: list[Image.Image], frames: bool = False) -> LatentCache:
    """Encode each view (all of one size) once; training then samples from the cached distributions.
    `frames`: a video VAE (Qwen-Image's) reads (B, C, frames, H, W): each view is one frame."""
    means, stds = [], []
    for start in range(0, len(views), VAE_ENCODE_BATCH):
        batch = pixels(views[start : start + VAE_ENCODE_BATCH]).to(vae.device, vae.dtype)
        distribution = vae.encode(batch.unsqueeze(2) if frames else batch).latent_dist
        means.append((distribution.mean.squeeze(2) if frames else distribution.mean).float())
        stds.append((distribution.std.squeeze(2) if frames else distribution.std).float())
    return LatentCache(mean=torch.cat(means), std=torch.cat(stds))


def class_images_for(config: RunConfig, class_dir: Path) -> list[Path]:
    """The class images a subject trains with: its own count of a shared generated set, or all supplied ones."""
    images = list_images(class_dir)
    return images if config.priors.class_images else images[: config.priors.num_class_images]


def training_fingerprint(settings: list, instance_images: list[Path], class_images: list[Path]) -> str:
    """Same inputs and settings -> same checkpoint folder, so a re-run resumes instead of restarting.
    A photo's caption and mask are inputs too."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in instance_images:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
        for kind, beside in (("caption", caption_file(path)), ("mask", mask_file(path))):
            if beside.is_file():
                digest.update(kind.encode() + hashlib.sha256(beside.read_bytes()).digest())
    digest.update(str(len(class_images)).encode())
    return digest.hexdigest()[:16]
