"""Stage: personalised super-resolution, the x4 upscaler fine-tuned on the subject (paper sec. 4.2).

Training pairs are each subject image at `superres.resolution` (the target) and the same
view 4x smaller (the condition), captioned like the base fine-tune. As in the upscaler, the
condition is noised by its low-resolution scheduler at a noise level that also goes to the
UNet as its class label; we draw that level per example from a low range
(`superres.train_noise_levels`), so the model learns to keep the detail a nearly clean
condition carries instead of inventing texture. The loop, loss, caching, checkpoints and
resume are the base fine-tune's own (dreambooth.training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from dreambooth.config import RunConfig
from dreambooth.errors import InputError
from dreambooth.images import list_images
from dreambooth.priors import class_images_for
from dreambooth.training.data import encode_views, pixels, training_fingerprint, training_views
from dreambooth.training.loop import OnLog, process_state, split_batch, train
from dreambooth.training.losses import DenoisingBatch, LossTerms, denoising_loss
from dreambooth.training.saving import FinetuneResult, save_trained_pipeline

UPSCALE_FACTOR = 4


def low_resolution(views: list[Image.Image]) -> torch.Tensor:
    """The upscaler's condition: each view 4x smaller (bicubic), in [-1, 1]."""
    return pixels([view.resize((view.width // UPSCALE_FACTOR, view.height // UPSCALE_FACTOR), Image.Resampling.BICUBIC) for view in views])


def noised_condition(low_res: torch.Tensor, noise: torch.Tensor, noise_levels: torch.Tensor, low_res_scheduler) -> torch.Tensor:
    """Noise augmentation of the condition, exactly as StableDiffusionUpscalePipeline applies it."""
    return low_res_scheduler.add_noise(low_res, noise, noise_levels)


def draw_noise_levels(count: int, levels: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    low, high = levels
    return torch.randint(low, high + 1, (count,), generator=generator)


def load_upscaler(reference: str, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionUpscalePipeline

    from dreambooth.models import best_device, resolve_model_source

    try:
        pipeline = StableDiffusionUpscalePipeline.from_pretrained(resolve_model_source(reference, setting="superres.base"), dtype=dtype)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"superres.base: cannot load the upscaler {reference!r} ({reason})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or best_device())


def finetune_upscaler(
    instance_dir: Path,
    class_dir: Optional[Path],
    identifier: str,
    config: RunConfig,
    output_dir: Path,
    on_log: Optional[OnLog] = None,
) -> FinetuneResult:
    """Fine-tune config.superres.base on the subject; write a StableDiffusionUpscalePipeline folder."""
    from diffusers import DDPMScheduler

    settings = config.superres
    training = split_batch(settings.training, process_state().num_processes)
    instance_images = list_images(instance_dir)
    if not instance_images:
        raise InputError(f"{instance_dir}: no subject images (run the ingest stage first)")
    use_prior = settings.prior_preservation and training.prior_loss_weight > 0 and class_dir is not None
    class_images = class_images_for(config, class_dir) if use_prior else []
    use_prior = use_prior and bool(class_images)

    device = process_state().device
    pipeline = load_upscaler(settings.base, device)
    if settings.train_noise_levels[1] > pipeline.config.max_noise_level:
        raise InputError(
            f"superres.train_noise_levels: {settings.train_noise_levels[1]} exceeds the upscaler's "
            f"max_noise_level {pipeline.config.max_noise_level}"
        )
    unet, vae, text_encoder, tokenizer = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    low_res_scheduler = pipeline.low_res_scheduler
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)

    def prepare(paths: list[Path]):
        views = training_views(paths, settings.resolution, training.center_crop, training.random_flip)
        return encode_views(vae, views), low_resolution(views)
    instance_latents, instance_low = prepare(instance_images)
    class_latents, class_low = prepare(class_images) if use_prior else (None, None)
    vae.to("cpu")

    subject = config.subject
    instance_prompt, class_prompt = subject.instance_prompt(identifier), subject.class_prompt()
    batch = training.batch_size
    prompts = [instance_prompt] * batch + ([class_prompt] * batch if use_prior else [])
    with torch.no_grad():
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        embeddings = text_encoder(tokens.input_ids.to(device))[0]
    text_encoder.to("cpu")
    if training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    scaling_factor = vae.config.scaling_factor
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def compute_loss(modules, step: int, generator: torch.Generator) -> LossTerms:
        picked = torch.randint(len(instance_latents), (batch,), generator=generator)
        latents, low = instance_latents.sample(picked, generator, scaling_factor), instance_low[picked]
        if class_latents is not None:
            picked_class = torch.randint(len(class_latents), (batch,), generator=generator)
            latents = torch.cat([latents, class_latents.sample(picked_class, generator, scaling_factor)])
            low = torch.cat([low, class_low[picked_class]])
        levels = draw_noise_levels(latents.shape[0], settings.train_noise_levels, generator)
        condition = noised_condition(low, torch.randn(low.shape, generator=generator), levels, low_res_scheduler)
        drawn = DenoisingBatch.draw(
            latents, embeddings, batch, generator, num_train_timesteps, device, training.noise_offset,
            condition=condition.to(device), class_labels=levels.to(device),
        )
        return denoising_loss(modules["unet"], noise_scheduler, drawn, training.prior_loss_weight, training.snr_gamma)

    fingerprint = training_fingerprint(
        ["superres", settings.model_dump(), subject.class_noun, identifier], instance_images, class_images
    )
    checkpoints = Path(config.storage.work_dir) / "checkpoints" / fingerprint
    result = train({"unet": unet}, {"unet": training.learning_rate}, compute_loss, training, checkpoints, on_log, "super-resolution")

    pipeline.unet = result.modules["unet"]
    metadata = {
        "identifier": identifier,
        "class_noun": subject.class_noun,
        "instance_prompt": instance_prompt,
        "base_upscaler": settings.base,
        "resolution": settings.resolution,
        "train_noise_levels": list(settings.train_noise_levels),
        "inference_noise_level": settings.inference_noise_level,
        "steps": training.max_steps,
    }
    images_per_step = batch * training.gradient_accumulation_steps * (2 if use_prior else 1)
    return save_trained_pipeline(pipeline, result, output_dir, metadata, checkpoints, training.keep_checkpoints, images_per_step)


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
    from dreambooth.models import inference_dtype

    settings = config.superres
    prompt = config.subject.instance_prompt(identifier)
    views = training_views(list_images(subject_dir)[:2], settings.resolution, True, False)
    inputs = [view.resize((view.width // UPSCALE_FACTOR, view.height // UPSCALE_FACTOR), Image.Resampling.BICUBIC) for view in views]
    sample_prompt = config.samples.prompts[0].format(identifier=identifier, class_noun=config.subject.class_noun)
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
