"""Training data, prepared once: each image's training views, their cached VAE latent
distributions, and the fingerprint that names a run's checkpoint folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth.config import RunConfig
from dreambooth.images import list_images, load_rgb, resize_and_crop

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


def training_views(images: list[Path], resolution: int, center_crop: bool, with_flips: bool) -> list[Image.Image]:
    """Each image at the training resolution, followed by its mirror when random flips are on."""
    views = []
    for path in images:
        image = resize_and_crop(load_rgb(path, max_pixels=1 << 40).image, resolution, center_crop)
        views.append(image)
        if with_flips:
            views.append(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return views


def pixels(views: list[Image.Image]) -> torch.Tensor:
    return torch.stack([_to_tensor(view) for view in views])


@torch.no_grad()
def encode_views(vae, views: list[Image.Image]) -> LatentCache:
    """Encode each view once; training then samples from the cached distributions."""
    means, stds = [], []
    for start in range(0, len(views), VAE_ENCODE_BATCH):
        batch = pixels(views[start : start + VAE_ENCODE_BATCH]).to(vae.device, vae.dtype)
        distribution = vae.encode(batch).latent_dist
        means.append(distribution.mean.float())
        stds.append(distribution.std.float())
    return LatentCache(mean=torch.cat(means), std=torch.cat(stds))


def class_images_for(config: RunConfig, class_dir: Path) -> list[Path]:
    """The class images a subject trains with: its own count of a shared generated set, or all supplied ones."""
    images = list_images(class_dir)
    return images if config.priors.class_images else images[: config.priors.num_class_images]


def training_fingerprint(settings: list, instance_images: list[Path], class_images: list[Path]) -> str:
    """Same inputs and settings -> same checkpoint folder, so a re-run resumes instead of restarting."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in instance_images:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(str(len(class_images)).encode())
    return digest.hexdigest()[:16]
