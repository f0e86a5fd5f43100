"""Stage 3: DreamBooth fine-tuning of the base text-to-image model with prior preservation.

Subject images are captioned `a [V] [class noun]`, the frozen model's class images
`a [class noun]`; each step denoises one batch holding both (paper sec. 4.2). The VAE
never changes, so every image is encoded once up front and its latent distribution cached;
with a frozen text encoder the two prompt embeddings are cached too. A step then costs
only the UNet (and the text encoder when it trains). `training.method` picks what trains: every
UNet weight (full, the paper), or low-rank adapters on its attention projections (lora).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from dreambooth.config import RunConfig, SamplerSettings
from dreambooth.errors import InputError
from dreambooth.images import list_images, load_rgb, resize_and_crop
from dreambooth.models import LORA_WEIGHTS, METADATA_FILE, SINGLE_FILE_LORA, load_pipeline, native_resolution
from dreambooth.priors import class_images_for
from dreambooth.training.loop import OnLog, process_state, split_batch, train
from dreambooth.training.losses import LossTerms, min_snr_weights, prior_preservation_loss

VAE_ENCODE_BATCH = 8


@dataclass(frozen=True)
class FinetuneResult:
    model_dir: str
    steps: int
    resumed_from_step: int
    steps_per_second: float
    images_per_second: float
    seconds: float
    final_loss: dict
    processes: int = 1
    validation_images: list = field(default_factory=list)  # [step, image path] pairs, oldest first


@dataclass
class LatentCache:
    """Per-image latent distributions (mean, std), unscaled, one row per image view."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, indices: torch.Tensor, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
        # A fresh draw from the cached distribution each step, as encoding anew would give.
        mean, std = self.mean[indices], self.std[indices]
        eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return (mean + std * eps) * scaling_factor

    def __len__(self) -> int:
        return self.mean.shape[0]


@dataclass
class DenoisingBatch:
    """One training batch: subject examples first, then class examples."""

    latents: torch.Tensor  # scaled by the VAE's scaling factor
    noise: torch.Tensor
    timesteps: torch.Tensor
    embeddings: torch.Tensor  # text-encoder hidden states, one row per example
    num_instance: int
    # Upscalers: the noised low-resolution image, concatenated to the latents, and its noise level.
    condition: Optional[torch.Tensor] = None
    class_labels: Optional[torch.Tensor] = None

    @classmethod
    def draw(
        cls, latents, embeddings, num_instance: int, generator, num_train_timesteps: int, device,
        noise_offset: float = 0.0, **conditioning,
    ):
        """Fresh noise and a uniform timestep per example, from the step's generator.

        `noise_offset` adds a per-channel constant to the noise, so the model also learns to
        change an image's overall brightness (very dark or light images).
        """
        noise = torch.randn(latents.shape, generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        return cls(
            latents=latents,
            noise=noise.to(device),
            timesteps=torch.randint(num_train_timesteps, (latents.shape[0],), generator=generator).to(device),
            embeddings=embeddings,
            num_instance=num_instance,
            **conditioning,
        )


def denoising_loss(
    unet, noise_scheduler, batch: DenoisingBatch, prior_weight: float, snr_gamma: Optional[float] = None
) -> LossTerms:
    """Noise the latents at their timesteps, predict, and apply the prior-preservation loss
    (min-SNR weighted per example when `snr_gamma` is set)."""
    noisy = noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    if batch.condition is not None:
        noisy = torch.cat([noisy, batch.condition], dim=1)
    prediction = unet(noisy, batch.timesteps, batch.embeddings, class_labels=batch.class_labels).sample
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"  # SD 2.x 768 px models
    target = noise_scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps) if v_prediction else batch.noise
    weights = None
    if snr_gamma is not None:
        weights = min_snr_weights(noise_scheduler.alphas_cumprod, batch.timesteps, snr_gamma, v_prediction)
    return prior_preservation_loss(prediction, target, batch.num_instance, prior_weight, weights)


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


def encode_latents(vae, images: list[Path], resolution: int, center_crop: bool, with_flips: bool) -> LatentCache:
    return encode_views(vae, training_views(images, resolution, center_crop, with_flips))


def _tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def training_fingerprint(settings: list, instance_images: list[Path], class_images: list[Path]) -> str:
    """Same inputs and settings -> same checkpoint folder, so a re-run resumes instead of restarting."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in instance_images:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(str(len(class_images)).encode())
    return digest.hexdigest()[:16]


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


def add_lora_adapters(unet, text_encoder, settings) -> None:
    """Freeze the weights and attach trainable low-rank adapters (peft) to the attention projections."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = settings.lora

    def adapter(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                          target_modules=targets, use_dora=lora.use_dora, init_lora_weights="gaussian")

    unet.requires_grad_(False)
    # The adapters' random initialisation follows training.seed, so a run is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        unet.add_adapter(adapter(lora.target_modules))
        if settings.train_text_encoder:
            # peft directly: transformers' own add_adapter wants a newer peft than the registry has
            inject_adapter_in_model(adapter(lora.text_encoder_target_modules), text_encoder)


def _save_lora_adapter(pipeline, modules: dict, output_dir: Path, single_file: bool) -> None:
    """The adapters alone, in diffusers' layout: `pipe.load_lora_weights(output_dir)` applies them to
    the base; with `single_file`, also in the kohya layout web UIs load."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_layers = {name: get_peft_model_state_dict(module) for name, module in modules.items()}
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(state) for name, state in peft_layers.items()}
    type(pipeline).save_lora_weights(output_dir, **layers, weight_name=LORA_WEIGHTS, safe_serialization=True)
    if single_file:
        prefixed = {f"{name}.{key}": tensor for name, state in peft_layers.items() for key, tensor in state.items()}
        kohya = {key: tensor.contiguous() for key, tensor in convert_state_dict_to_kohya(prefixed).items()}
        save_file(kohya, output_dir / SINGLE_FILE_LORA)


def save_trained_pipeline(
    pipeline, result, output_dir: Path, metadata: dict, checkpoints: Path, keep_checkpoints: bool, images_per_step: int
) -> FinetuneResult:
    """On the main process: the whole pipeline folder (safetensors) or, for LoRA, the adapter alone,
    with its metadata; then drop the checkpoints, which only existed to survive a kill."""
    if process_state().is_main_process:
        pipeline.to("cpu")
        output_dir.mkdir(parents=True, exist_ok=True)
        if metadata.get("method") == "lora":
            _save_lora_adapter(pipeline, result.modules, output_dir, metadata.get("single_file", False))
        else:
            pipeline.save_pretrained(output_dir, safe_serialization=True)
        (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    return FinetuneResult(
        model_dir=str(output_dir),
        steps=result.steps_completed,
        resumed_from_step=result.resumed_from_step,
        steps_per_second=result.steps_per_second,
        images_per_second=result.steps_per_second * images_per_step,
        seconds=result.seconds,
        final_loss=result.final_loss,
        processes=result.processes,
    )
