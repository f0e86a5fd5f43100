"""Stage: personalised super-resolution, the x4 upscaler fine-tuned on the subject (paper sec. 4.2).

Training pairs are each subject image at `superres.resolution` (the target) and the same view 4x
smaller (the condition), captioned like the base fine-tune; the upscaler's recipe
(dreambooth.training.recipes.upscaler) adds the low-noise augmentation of that condition. The
driver, loop, loss, caching, checkpoints and resume are the base fine-tune's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from dreambooth.config import RunConfig
from dreambooth.errors import InputError
from dreambooth.images import list_images
from dreambooth.training.data import ViewShape, training_views
from dreambooth.training.driver import subject_training
from dreambooth.training.loop import OnLog
from dreambooth.training.recipes.upscaler import UPSCALE_FACTOR, UpscalerRecipe
from dreambooth.training.saving import FineTuneResult


def load_upscaler(reference: str, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionUpscalePipeline

    from dreambooth.models.loading import best_device, load_failure_reason, resolve_model_source, weights_format

    try:
        source = resolve_model_source(reference, setting="superres.base")
        pipeline = StableDiffusionUpscalePipeline.from_pretrained(source, dtype=dtype, **weights_format())
    except (OSError, ValueError) as error:
        raise InputError(f"superres.base: cannot load the upscaler {reference!r} ({load_failure_reason(error)})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or best_device())


def fine_tune_upscaler(
    instance_dir: Path,
    class_dir: Optional[Path],
    identifier: str,
    config: RunConfig,
    output_dir: Path,
    on_log: Optional[OnLog] = None,
    release: bool = True,
    tracking_run: str = "",
) -> FineTuneResult:
    """Fine-tune config.superres.base on the subject; write a StableDiffusionUpscalePipeline folder.
    `release`: see train_and_save; `tracking_run`: the run training, named in checkpoints."""
    settings = config.superres
    subject = subject_training(instance_dir, class_dir, identifier, config, settings.training,
                               settings.prior_preservation and class_dir is not None, "superres.prior_preservation",
                               ["superres", settings.model_dump()])

    def make_recipe(training, device):
        return UpscalerRecipe(load_upscaler(settings.base, device), training, device, settings.resolution, noise_levels=settings.train_noise_levels)

    def describe(recipe) -> dict:
        return {
            "identifier": identifier,
            "class_noun": config.subject.class_noun,
            "instance_prompt": subject.instance_prompt,
            "base_upscaler": settings.base,
            "resolution": settings.resolution,
            "train_noise_levels": list(settings.train_noise_levels),
            "inference_noise_level": settings.inference_noise_level,
            "steps": subject.settings.max_steps,
        }

    return subject.train(make_recipe, output_dir, describe, on_log, release=release, description="super-resolution", owner=tracking_run)


def upscale(pipeline, prompts: list[str], images: list[Image.Image], noise_level: int, sampler, seed: int = 0) -> list[Image.Image]:
    """Upscale each image with its prompt, seeded per image, in batches of same-sized images."""
    upscaled: list[Image.Image] = []
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < sampler.batch_size and images[end].size == images[start].size:
            end += 1
        upscaled += pipeline(
            prompt=prompts[start:end],
            image=images[start:end],
            noise_level=noise_level,
            num_inference_steps=sampler.num_inference_steps,
            guidance_scale=sampler.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(start, end)],
        ).images
        start = end
    return upscaled


def upscale_comparison_grid(subject_dir: Path, model_dir: Path, upscaler_dir: Path, identifier: str, config: RunConfig) -> Image.Image:
    """Rows: subject photos (held in) and fine-tuned samples; columns: low-res input, generic, personalised."""
    from dreambooth.generation import generate, load_sampling_pipeline
    from dreambooth.images import labelled_grid
    from dreambooth.models.loading import inference_dtype

    settings = config.superres
    prompt = config.subject.instance_prompt(identifier)
    views = [view.image for view in training_views(list_images(subject_dir)[:2], ViewShape(settings.resolution), False)]
    inputs = [view.resize((view.width // UPSCALE_FACTOR, view.height // UPSCALE_FACTOR), Image.Resampling.BICUBIC) for view in views]
    sample_prompt = config.subject.render(config.samples.prompts[0], identifier)
    base = load_sampling_pipeline(str(model_dir), config.samples.sampler)
    inputs += generate(base, [(sample_prompt, config.samples.sampler.seed)], config.samples.sampler, config.model.resolution)
    del base
    prompts = [prompt] * (len(inputs) - 1) + [sample_prompt]
    dtype = inference_dtype(settings.sampler.precision)
    outputs = {}
    for label, reference in (("generic upscaler", settings.base), ("personalised upscaler", str(upscaler_dir))):
        pipeline = load_upscaler(reference, dtype=dtype)
        outputs[label] = upscale(pipeline, prompts, inputs, settings.inference_noise_level, settings.sampler, settings.sampler.seed)
        del pipeline
    rows = []
    for i, (text, low) in enumerate(zip(prompts, inputs)):
        title = f"subject photo {i}: {text}" if i < len(views) else f"fine-tuned sample: {text}"
        size = outputs["personalised upscaler"][i].size
        cells = [(f"low-res input ({low.width} px)", low.resize(size, Image.Resampling.NEAREST))]
        cells += [(f"{label} ({size[0]} px)", images[i]) for label, images in outputs.items()]
        rows.append((title, cells))
    return labelled_grid(rows)
