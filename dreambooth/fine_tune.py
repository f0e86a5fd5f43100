"""Stage 3: DreamBooth fine-tuning of the base text-to-image model with prior preservation.

Subject images are captioned `a [V] [class noun]`, the frozen model's class images
`a [class noun]`; each step denoises one batch holding both (paper sec. 4.2). The model family
(sd, sdxl, sd3, flux: config model.family, else read from model_index.json) picks the training recipe;
the driver (dreambooth.training.driver) does the rest. `training.method` picks what trains: every
denoiser weight (full, the paper), low-rank adapters (lora), a new token's embedding
(textual_inversion, the paper's baseline), or both of those (pivotal).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from dreambooth.config import DataSettings, RunConfig, SamplerSettings
from dreambooth.models.loading import load_pipeline, model_family
from dreambooth.training.driver import subject_training
from dreambooth.training.loop import OnLog, OnStep
from dreambooth.training.recipes import recipe_class
from dreambooth.training.saving import FineTuneResult


def fine_tune(
    instance_dir: Path,
    class_dir: Optional[Path],
    identifier: str,
    config: RunConfig,
    output_dir: Path,
    on_log: Optional[OnLog] = None,
    release: bool = True,
    tracking_run: str = "",
) -> FineTuneResult:
    """Fine-tune config.model.base on the subject; write a full diffusers pipeline (or what loads on
    the base: an adapter, an embedding, with its base-model reference) to output_dir. `release`: see train_and_save;
    `tracking_run`: the run training, named in checkpoints. training.method reference trains nothing:
    the folder names model.reference and holds the photos it draws from (dreambooth.baseline)."""
    if config.training.method == "reference":
        from dreambooth.baseline import write_baseline_result

        return write_baseline_result(instance_dir, config, output_dir)
    select = config.evaluation.select
    snapshot_steps = select.scored_steps(config.training.max_steps) if select else []
    subject = subject_training(instance_dir, class_dir, identifier, config, config.training, config.priors.enabled, "priors.enabled",
                               # a run that keeps steps aside never resumes one that did not
                               [config.model.model_dump(), config.training.model_dump(), *([snapshot_steps] if select else []),
                                *([config.data.model_dump()] if config.data != DataSettings() else [])],
                               snapshot_steps)
    settings = subject.settings
    validation_dir = Path(config.storage.work_dir) / "validation" / subject.fingerprint

    def make_recipe(training, device):
        family = model_family(config.model.base, config.model.revision, declared=config.model.family)
        pipeline = load_pipeline(config.model.base, config.model.revision, device=device, vae=config.model.vae,
                                 quantization=config.model.quantization, quantize_text_encoders=config.model.quantize_text_encoders)
        return recipe_class(family)(pipeline, training, device, config.model.resolution, data=config.data)

    def draw_validation(recipe) -> OnStep:
        prompt = config.subject.render(settings.validation_prompt, identifier)

        def on_step(step: int) -> None:
            if step % settings.validation_every == 0 or step == settings.max_steps:
                draw_validation_images(recipe, prompt, config.samples.sampler.guidance_scale, validation_dir, step,
                                       subject.fingerprint[:8])

        return on_step

    def describe(recipe) -> dict:
        return {
            "identifier": identifier,
            "class_noun": config.subject.class_noun,
            "fingerprint": subject.fingerprint,  # its first 8 hex digits are the watermark of the images it draws
            "instance_prompt": subject.instance_prompt,
            "class_prompt": subject.class_prompt if subject.class_images else None,
            "base_model": config.model.base,
            "base_revision": config.model.revision,
            "vae": config.model.vae,
            "family": recipe.family,
            "method": settings.method,
            "single_file": settings.trains_adapter and settings.lora.export_single_file,
            "resolution": recipe.training_resolution,
            "steps": settings.max_steps,
        }

    # With a selection to make (the fine-tune task makes it), the checkpoint folder, which holds the steps' models,
    # outlives training.
    saved = subject.train(make_recipe, output_dir, describe, on_log, draw_validation if settings.validation_every else None,
                          release and not select, owner=tracking_run)
    # Steps of a killed attempt drew theirs before it was killed: the folder holds the whole curve.
    drawn = sorted(validation_dir.glob("step-*.png")) if settings.validation_every else []
    return replace(saved, validation_images=_steps_and_paths(drawn))


def _steps_and_paths(drawn: list[Path]) -> list:
    return [[int(path.name.split("-")[1]), str(path)] for path in drawn]


VALIDATION_SEED = 8888


@torch.no_grad()
def draw_validation_images(recipe, prompt: str, guidance_scale: float, folder: Path, step: int, payload: str) -> None:
    """The model being trained, sampled with a fixed prompt and seeds (marked with `payload`); frozen parts visit the device briefly."""
    from dreambooth.generation import generate
    from dreambooth.watermark import save_marked

    pipeline, settings = recipe.pipeline, recipe.settings
    frozen = [pipeline.vae, *(getattr(pipeline, name) for name in recipe.text_encoders)]
    parked = [module for module in frozen if module.device != recipe.device]
    for module in parked:
        module.to(recipe.device)
    denoiser = getattr(pipeline, recipe.denoiser)
    was_training = denoiser.training
    denoiser.eval()
    sampler = SamplerSettings(num_inference_steps=settings.validation_inference_steps, batch_size=settings.validation_images,
                              guidance_scale=guidance_scale)
    requests = [(prompt, VALIDATION_SEED + i) for i in range(settings.validation_images)]
    images = generate(pipeline, requests, sampler, recipe.training_resolution)
    denoiser.train(was_training)
    for module in parked:
        module.to("cpu")
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        save_marked(image, folder / f"step-{step:06d}-{index}.png", payload)
