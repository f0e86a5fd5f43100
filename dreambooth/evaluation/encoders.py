"""The image and text encoders the DreamBench metrics are computed with.

Each loads by hub id, local folder or `tiny://` reference through the same code, embeds in
batches, and does its own preprocessing with PIL (no torchvision):
- DINO ViT-S/16 (`facebook/dino-vits16`): CLS token; resize 256 bicubic, centre crop 224, ImageNet normalisation.
- CLIP (`openai/clip-vit-base-patch32`): projected image and text embeddings; the model's own
  resize, crop and normalisation from its preprocessor_config.json.
- LPIPS (AlexNet): perceptual distance between image pairs (dreambooth.models.lpips).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth.errors import InputError
from dreambooth.images import center_crop, resize_shorter_side
from dreambooth.models.loading import best_device, load_failure_reason, resolve_model_source, weights_format

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [
            np.asarray(center_crop(resize_shorter_side(image.convert("RGB"), self.resize), self.crop), dtype=np.float32)
            for image in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std


def _load_error(setting: str, reference: str, error: Exception) -> InputError:
    return InputError(f"evaluation.{setting}: cannot load {reference!r} ({load_failure_reason(error)})")


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DinoEncoder:
    preprocessing = Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def __init__(self, reference: str, batch_size: int = 32, device: torch.device | None = None) -> None:
        from transformers import ViTModel

        self.name, self.batch_size, self.device = reference, batch_size, device or best_device()
        try:
            self.model = ViTModel.from_pretrained(resolve_model_source(reference, setting="evaluation.dino_model"), add_pooling_layer=False, **weights_format())
        except (OSError, ValueError) as error:
            raise _load_error("dino_model", reference, error) from None
        self.model.eval().to(self.device)

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        chunks = [
            self.model(pixel_values=self.preprocessing(batch).to(self.device)).last_hidden_state[:, 0].float().cpu()
            for batch in _batched(images, self.batch_size)
        ]
        return torch.cat(chunks)


def clip_preprocessing(source: str, size: int, setting: str, reference: str) -> Preprocessing:
    """A CLIP vision model's own resize, crop and normalisation, from its preprocessor_config.json."""
    config_file = Path(source) / "preprocessor_config.json"
    try:
        if not config_file.is_file():
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(source, "preprocessor_config.json"))
        settings = json.loads(config_file.read_text())
        resize, crop = settings["size"], settings["crop_size"]
        mean, std = tuple(settings["image_mean"]), tuple(settings["image_std"])
    except Exception as error:  # guessing another model's preprocessing would skew what it sees
        raise InputError(
            f"{setting}: {reference!r} has no readable preprocessor_config.json with size, crop_size, "
            f"image_mean and image_std ({load_failure_reason(error)})"
        ) from None
    return Preprocessing(
        resize=resize.get("shortest_edge", size) if isinstance(resize, dict) else resize,
        crop=crop.get("height", size) if isinstance(crop, dict) else crop,
        mean=mean,
        std=std,
    )


class ClipEncoder:
    def __init__(self, reference: str, batch_size: int = 32, device: torch.device | None = None) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.name, self.batch_size, self.device = reference, batch_size, device or best_device()
        self.source = source = resolve_model_source(reference, setting="evaluation.clip_model")
        try:
            self.model = CLIPModel.from_pretrained(source, **weights_format())
            self.tokenizer = CLIPTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise _load_error("clip_model", reference, error) from None
        self.model.eval().to(self.device)
        self.preprocessing = clip_preprocessing(source, self.model.config.vision_config.image_size, "evaluation.clip_model", reference)

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        chunks = [
            _pooled(self.model.get_image_features(pixel_values=self.preprocessing(batch).to(self.device))).float().cpu()
            for batch in _batched(images, self.batch_size)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for batch in _batched(texts, self.batch_size):
            tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=77, return_tensors="pt")
            features = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
            chunks.append(_pooled(features).float().cpu())
        return torch.cat(chunks)


class LpipsDistance:
    def __init__(self, reference: str, batch_size: int = 32, device: torch.device | None = None) -> None:
        from dreambooth.models.lpips import load_lpips

        self.name, self.batch_size, self.device = reference, batch_size, device or best_device()
        folder = Path(resolve_model_source(reference, setting="evaluation.lpips_model"))
        if not (folder / "model.safetensors").is_file():
            raise InputError(
                f"evaluation.lpips_model: {reference!r} is not an LPIPS folder (config.json + model.safetensors; "
                "make one with python -m dreambooth.models.lpips)"
            )
        self.model = load_lpips(folder).to(self.device)

    @staticmethod
    def _pixels(images: list[Image.Image]) -> torch.Tensor:
        arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0

    @torch.no_grad()
    def pairwise(self, pairs: list[tuple[Image.Image, Image.Image]]) -> torch.Tensor:
        """Distance of each (a, b) pair; images of one pair share a size."""
        distances = []
        for batch in _batched(pairs, self.batch_size):
            first = self._pixels([a for a, _ in batch]).to(self.device)
            second = self._pixels([b for _, b in batch]).to(self.device)
            distances.append(self.model(first, second).float().cpu())
        return torch.cat(distances) if distances else torch.zeros(0)
