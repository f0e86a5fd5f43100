"""Did the fine-tune learn the subject, and what did it cost the class? Measured as the model's own
training objective, so it means something even when the samples cannot (random test weights).

The denoising loss of the subject photos under the subject prompt (`a [V] dog`), for the base model
and for the fine-tuned one, with the same noise, timesteps and latents for both; the same on the
class images under the class prompt. A subject loss well below the base model's says the model
learned to reconstruct these photos from `[V]`; a class loss that rose says the class itself drifted
(what prior preservation guards against). It does not say the model generalises: DINO, CLIP-I and
CLIP-T on new prompts do that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dreambooth.config import RunConfig
from dreambooth.images import list_images
from dreambooth.models.loading import best_device, inference_dtype, load_pipeline, model_family

CHECK_SEED = 2208  # noise, timesteps and latent samples: the same draws for both models
DRAWS = 4  # noise draws per image
MAX_CLASS_IMAGES = 16


@dataclass(frozen=True)
class LearningCheck:
    subject_base: float
    subject_tuned: float
    class_base: Optional[float] = None  # None: no class images to measure drift on
    class_tuned: Optional[float] = None

    def metrics(self) -> dict[str, float]:
        values = {
            "learn/subject_loss_base": self.subject_base,
            "learn/subject_loss_tuned": self.subject_tuned,
            "learn/subject_loss_change": self.subject_tuned / self.subject_base - 1.0,
        }
        if self.class_base is not None and self.class_tuned is not None:
            values.update({
                "learn/class_loss_base": self.class_base,
                "learn/class_loss_tuned": self.class_tuned,
                "learn/class_loss_change": self.class_tuned / self.class_base - 1.0,
            })
        return values

    def markdown(self) -> str:
        rows = [("subject photos, subject prompt", self.subject_base, self.subject_tuned)]
        if self.class_base is not None and self.class_tuned is not None:
            rows.append(("class images, class prompt", self.class_base, self.class_tuned))
        lines = [
            "## Learning check", "",
            "Denoising loss with the same noise and timesteps for both models (lower: the model reconstructs the images better).",
            "", "| images | base model | fine-tuned | change |", "|---|---|---|---|",
        ]
        lines += [f"| {label} | {base:.4f} | {tuned:.4f} | {100 * (tuned / base - 1):+.1f}% |" for label, base, tuned in rows]
        return "\n".join(lines) + "\n"


@torch.no_grad()
def _losses(reference: str, revision: Optional[str], vae: Optional[str], groups: list[tuple[list[Path], str]], config: RunConfig) -> list[float]:
    """The mean denoising loss of each (images, prompt) group under one model."""
    from dreambooth.training.recipes import recipe_class

    device, dtype = best_device(), inference_dtype(config.evaluation.sampler.precision)
    pipeline = load_pipeline(reference, revision, torch_dtype=dtype, device=device, vae=vae)
    family = model_family(config.model.base, config.model.revision, declared=config.model.family)
    # The plain objective: no noise offset, no min-SNR weights, no flips (the method only decides
    # what would train; nothing does here).
    # (no mask: the whole photo is scored).
    settings = config.training.model_copy(update={"noise_offset": 0.0, "snr_gamma": None, "random_flip": False, "mask_weight": 1.0})
    recipe = recipe_class(family)(pipeline, settings, device, config.model.resolution, data=config.data)
    denoiser = {recipe.denoiser: getattr(pipeline, recipe.denoiser).eval()}
    losses = []
    for paths, prompt in groups:
        images = recipe.prepare_images(paths)
        # one batch per bucket, its conditioning encoded once for every draw
        conditionings = [recipe.encode_prompts({}, [prompt] * len(views.latents)) for views in images.groups]
        generator = torch.Generator(device="cpu").manual_seed(CHECK_SEED)
        total = 0.0
        for _ in range(DRAWS):
            for index, (views, conditioning) in enumerate(zip(images.groups, conditionings)):
                count = len(views.latents)
                latents, extras = recipe.sample(images, torch.arange(count), generator, index)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    terms = recipe.loss(denoiser, latents.to(device), extras, conditioning, count, generator)
                total += terms.instance.float().item() * count / len(paths)
        losses.append(total / DRAWS)
    del pipeline
    return losses


def learning_check(model_dir: str, subject_dir: Path, class_dir: Optional[Path], identifier: str, config: RunConfig) -> LearningCheck:
    """Base vs fine-tuned denoising loss on the subject photos (and on the class images when given)."""
    from dreambooth.training.data import class_images_for

    groups = [(list_images(subject_dir), config.subject.instance_prompt(identifier))]
    class_images = class_images_for(config, class_dir)[:MAX_CLASS_IMAGES] if class_dir else []
    if class_images:
        groups.append((class_images, config.subject.class_prompt()))
    base = _losses(config.model.base, config.model.revision, config.model.vae, groups, config)
    tuned = _losses(model_dir, None, None, groups, config)
    return LearningCheck(base[0], tuned[0], *(base[1:2] or [None]), *(tuned[1:2] or [None]))
