"""Stage 3: DreamBooth fine-tuning of the base text-to-image model with prior preservation.

Subject images are captioned `a [V] [class noun]`, the frozen model's class images
`a [class noun]`; each step denoises one batch holding both (paper sec. 4.2). The model family
(sd, sdxl, flux: config model.family, else read from model_index.json) picks the training recipe;
the driver (dreambooth.training.driver) does the rest. `training.method` picks what trains: every
denoiser weight (full, the paper), or low-rank adapters on its attention projections (lora).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from dreambooth.config import RunConfig, SamplerSettings
from dreambooth.errors import InputError
from dreambooth.images import list_images
from dreambooth.models import load_pipeline, model_family
from dreambooth.priors import class_images_for
from dreambooth.training.data import training_fingerprint
from dreambooth.training.driver import FinetuneJob, train_and_save
from dreambooth.training.loop import OnLog, process_state, split_batch
from dreambooth.training.recipes import recipe_class
from dreambooth.training.saving import FinetuneResult, claim_checkpoints, saved_result


def finetune(
    instance_dir: Path,
    class_dir: Optional[Path],
    identifier: str,
    config: RunConfig,
    output_dir: Path,
    on_log: Optional[OnLog] = None,
    release: bool = True,
    tracking_run: str = "",
) -> FinetuneResult:
    """Fine-tune config.model.base on the subject; write a full diffusers pipeline (or, for LoRA,
    the adapter and its base-model reference) to output_dir. `release`: see train_and_save;
    `tracking_run`: the run training, named in checkpoints."""
    settings = split_batch(config.training, process_state().num_processes)
    instance_images = list_images(instance_dir)
    if not instance_images:
        raise InputError(f"{instance_dir}: no subject images (run the ingest stage first)")
    use_prior = config.priors.enabled and settings.prior_loss_weight > 0
    class_images = class_images_for(config, class_dir) if use_prior and class_dir else []
    if use_prior and not class_images:
        raise InputError(f"{class_dir}: no class images for prior preservation (priors.enabled is true)")

    subject = config.subject
    instance_prompt, class_prompt = subject.instance_prompt(identifier), subject.class_prompt()
    fingerprint = training_fingerprint(
        [config.model.model_dump(), config.training.model_dump(), subject.class_noun, identifier], instance_images, class_images
    )
    checkpoints = Path(config.storage.work_dir) / "checkpoints" / fingerprint
    validation_dir = Path(config.storage.work_dir) / "validation" / fingerprint
    drawn = sorted(validation_dir.glob("step-*.png")) if settings.validation_every else []
    with claim_checkpoints(checkpoints):  # one run at a time per checkpoint folder
        reused = saved_result(checkpoints, output_dir)
        if reused is not None:
            return replace(reused, validation_images=_steps_and_paths(drawn))

        family = model_family(config.model.base, config.model.revision, declared=config.model.family)
        device = process_state().device
        pipeline = load_pipeline(config.model.base, config.model.revision, device=device, vae=config.model.vae)
        recipe = recipe_class(family)(pipeline, settings, device, config.model.resolution)
        on_step = None
        if settings.validation_every:
            prompt = settings.validation_prompt.format(identifier=identifier, class_noun=subject.class_noun)

            def on_step(step: int) -> None:
                if step % settings.validation_every == 0 or step == settings.max_steps:
                    draw_validation_images(recipe, prompt, config.samples.sampler.guidance_scale, validation_dir, step)

        job = FinetuneJob(recipe, instance_images, class_images, instance_prompt, class_prompt, checkpoints, owner=tracking_run)
        metadata = {
            "identifier": identifier,
            "class_noun": subject.class_noun,
            "instance_prompt": instance_prompt,
            "class_prompt": class_prompt if use_prior else None,
            "base_model": config.model.base,
            "base_revision": config.model.revision,
            "vae": config.model.vae,
            "family": family,
            "method": settings.method,
            "single_file": settings.method == "lora" and settings.lora.export_single_file,
            "resolution": recipe.training_resolution,
            "steps": settings.max_steps,
        }
        saved = train_and_save(job, output_dir, metadata, on_log, on_step, release)
    # Steps of a killed attempt drew theirs before it was killed: the folder holds the whole curve.
    drawn = sorted(validation_dir.glob("step-*.png")) if settings.validation_every else []
    return replace(saved, validation_images=_steps_and_paths(drawn))


def _steps_and_paths(drawn: list[Path]) -> list:
    return [[int(path.name.split("-")[1]), str(path)] for path in drawn]


VALIDATION_SEED = 8888


@torch.no_grad()
def draw_validation_images(recipe, prompt: str, guidance_scale: float, folder: Path, step: int) -> None:
    """The model being trained, sampled with a fixed prompt and seeds; frozen parts visit the device briefly."""
    from dreambooth.generation import generate

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
        image.save(folder / f"step-{step:06d}-{index}.png")
