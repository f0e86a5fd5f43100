"""evaluation.safety_checker: an output safety check that keeps a model whose images it flags out of the
registry (the DreamBooth paper's ethics section; diffusers' Stable Diffusion pipelines run the same model
on every image they return).

The checker is diffusers' StableDiffusionSafetyChecker (`CompVis/stable-diffusion-safety-checker`):
CLIP ViT-L/14 image embeddings compared by cosine with 17 concept and 3 special-care embeddings, each
against its own threshold; an image is flagged when any concept's score passes its threshold. It reads
the evaluation's images (the DreamBench prompts, drawn from the fine-tuned model) before registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dreambooth.errors import InputError
from dreambooth.evaluation.encoders import clip_preprocessing
from dreambooth.images import load_rgb
from dreambooth.models.loading import load_failure_reason, resolve_model_source, weights_format

SETTING = "evaluation.safety_checker"


@dataclass(frozen=True)
class SafetyVerdict:
    checker: str
    checked: int
    flagged: list[str]  # the flagged images, relative to the evaluation's folder

    @property
    def passed(self) -> bool:
        return not self.flagged

    def describe(self) -> str:
        if self.passed:
            return f"safety checker {self.checker}: none of {self.checked} images flagged"
        shown = ", ".join(self.flagged[:5]) + (", ..." if len(self.flagged) > 5 else "")
        return f"safety checker {self.checker} flagged {len(self.flagged)} of {self.checked} images ({shown})"


@torch.no_grad()
def check_images(reference: str, folder: Path, image_files: list[str], batch_size: int = 32) -> SafetyVerdict:
    """Run the checker over the images (paths relative to folder)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    source = resolve_model_source(reference, setting=SETTING)
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(source, **weights_format()).eval()
    except (OSError, ValueError) as error:
        raise InputError(f"{SETTING}: cannot load {reference!r} ({load_failure_reason(error)})") from None
    preprocessing = clip_preprocessing(source, checker.config.vision_config.image_size, SETTING, reference)
    flagged = []
    for start in range(0, len(image_files), batch_size):
        names = image_files[start : start + batch_size]
        images = [load_rgb(folder / name, 1 << 40).image for name in names]
        _, concepts = checker(clip_input=preprocessing(images), images=[np.asarray(image) for image in images])
        flagged += [name for name, found in zip(names, concepts) if found]
    return SafetyVerdict(reference, len(image_files), flagged)
