"""Stage 3: DreamBooth fine-tuning of the base text-to-image model with prior preservation.

Subject images are captioned `a [V] [class noun]`, the frozen model's class images
`a [class noun]`; each step denoises one batch holding both (paper sec. 4.2). The VAE
never changes, so every image is encoded once up front and its latent distribution cached;
with a frozen text encoder the two prompt embeddings are cached too. A step then costs
only the UNet (and the text encoder when it trains). `training.method` picks what trains: every
UNet weight (full, the paper), or low-rank adapters on its attention projections (lora).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from dreambooth.config import RunConfig, SamplerSettings
from dreambooth.errors import InputError
from dreambooth.images import list_images
from dreambooth.models import load_pipeline, native_resolution
from dreambooth.priors import class_images_for
from dreambooth.training.data import encode_latents, training_fingerprint
from dreambooth.training.lora import add_lora_adapters
from dreambooth.training.loop import OnLog, process_state, split_batch, train
from dreambooth.training.losses import DenoisingBatch, LossTerms, denoising_loss
from dreambooth.training.saving import FinetuneResult, save_trained_pipeline


def _tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def finetune(
    instance_dir: Path,
    class_dir: Optional[Path],
    identifier: str,
    config: RunConfig,
    output_dir: Path,
    on_log: Optional[OnLog] = None,
) -> FinetuneResult:
    """Fine-tune config.model.base on the subject; write a full diffusers pipeline (or, for LoRA,
    the adapter and its base-model reference) to output_dir."""
    from diffusers import DDPMScheduler

    settings = split_batch(config.training, process_state().num_processes)
    instance_images = list_images(instance_dir)
    if not instance_images:
        raise InputError(f"{instance_dir}: no subject images (run the ingest stage first)")
    use_prior = config.priors.enabled and settings.prior_loss_weight > 0
    class_images = class_images_for(config, class_dir) if use_prior and class_dir else []
    if use_prior and not class_images:
        raise InputError(f"{class_dir}: no class images for prior preservation (priors.enabled is true)")

    device = process_state().device
    pipeline = load_pipeline(config.model.base, config.model.revision, device=device)
    unet, vae, text_encoder, tokenizer = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    resolution = config.model.resolution or native_resolution(pipeline)

    vae.requires_grad_(False)
    instance_latents = encode_latents(vae, instance_images, resolution, settings.center_crop, settings.random_flip)
    class_latents = encode_latents(vae, class_images, resolution, settings.center_crop, settings.random_flip) if use_prior else None
    vae.to("cpu")  # not needed again until the pipeline is saved

    subject = config.subject
    instance_prompt, class_prompt = subject.instance_prompt(identifier), subject.class_prompt()
    batch = settings.batch_size
    prompt_ids = torch.cat(
        [_tokenize(tokenizer, instance_prompt)] * batch + ([_tokenize(tokenizer, class_prompt)] * batch if use_prior else [])
    ).to(device)
    text_encoder.requires_grad_(settings.train_text_encoder and settings.method == "full")
    if settings.method == "lora":
        add_lora_adapters(unet, text_encoder, settings)
    cached_embeddings = None
    if not settings.train_text_encoder:
        with torch.no_grad():
            cached_embeddings = text_encoder(prompt_ids)[0]
        text_encoder.to("cpu")

    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if settings.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    scaling_factor = vae.config.scaling_factor
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def compute_loss(modules, step: int, generator: torch.Generator) -> LossTerms:
        latents = instance_latents.sample(torch.randint(len(instance_latents), (batch,), generator=generator), generator, scaling_factor)
        if class_latents is not None:
            class_part = class_latents.sample(torch.randint(len(class_latents), (batch,), generator=generator), generator, scaling_factor)
            latents = torch.cat([latents, class_part])
        embeddings = cached_embeddings if cached_embeddings is not None else modules["text_encoder"](prompt_ids)[0]
        drawn = DenoisingBatch.draw(latents, embeddings, batch, generator, num_train_timesteps, device, settings.noise_offset)
        return denoising_loss(modules["unet"], noise_scheduler, drawn, settings.prior_loss_weight, settings.snr_gamma)

    modules = {"unet": unet}
    learning_rates = {"unet": settings.learning_rate}
    if settings.train_text_encoder:
        modules["text_encoder"] = text_encoder
        learning_rates["text_encoder"] = settings.text_encoder_learning_rate or settings.learning_rate

    fingerprint = training_fingerprint(
        [config.model.model_dump(), config.training.model_dump(), subject.class_noun, identifier], instance_images, class_images
    )
    checkpoints = Path(config.storage.work_dir) / "checkpoints" / fingerprint
    validation_dir = Path(config.storage.work_dir) / "validation" / fingerprint
    on_step = None
    if settings.validation_every:
        prompt = settings.validation_prompt.format(identifier=identifier, class_noun=subject.class_noun)

        def on_step(step: int) -> None:
            if step % settings.validation_every == 0 or step == settings.max_steps:
                draw_validation_images(pipeline, prompt, settings, resolution, validation_dir, step, device)

    result = train(modules, learning_rates, compute_loss, settings, checkpoints, on_log, "fine-tune", on_step)

    for name, module in result.modules.items():
        setattr(pipeline, name, module)
    metadata = {
        "identifier": identifier,
        "class_noun": subject.class_noun,
        "instance_prompt": instance_prompt,
        "class_prompt": class_prompt if use_prior else None,
        "base_model": config.model.base,
        "base_revision": config.model.revision,
        "method": settings.method,
        "single_file": settings.method == "lora" and settings.lora.export_single_file,
        "resolution": resolution,
        "steps": settings.max_steps,
    }
    images_per_step = batch * settings.gradient_accumulation_steps * (2 if use_prior else 1)
    saved = save_trained_pipeline(pipeline, result, output_dir, metadata, checkpoints, settings.keep_checkpoints, images_per_step)
    # Steps of a killed attempt drew theirs before it was killed: the folder holds the whole curve.
    drawn = sorted(validation_dir.glob("step-*.png")) if settings.validation_every else []
    return replace(saved, validation_images=[[int(path.name.split("-")[1]), str(path)] for path in drawn])


VALIDATION_SEED = 8888


@torch.no_grad()
def draw_validation_images(pipeline, prompt: str, settings, resolution: int, folder: Path, step: int, device) -> None:
    """The model being trained, sampled with a fixed prompt and seeds; frozen parts visit the device briefly."""
    from dreambooth.generation import generate

    parked = [module for module in (pipeline.vae, pipeline.text_encoder) if module.device != device]
    for module in parked:
        module.to(device)
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    sampler = SamplerSettings(num_inference_steps=settings.validation_inference_steps, batch_size=settings.validation_images)
    requests = [(prompt, VALIDATION_SEED + i) for i in range(settings.validation_images)]
    images = generate(pipeline, requests, sampler, resolution)
    pipeline.unet.train(was_training)
    for module in parked:
        module.to("cpu")
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"step-{step:06d}-{index}.png")
