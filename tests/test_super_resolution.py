"""Personalised super-resolution: it learns the subject, at the noise level configured, and saves a real upscaler."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline
from PIL import Image

from dreambooth.training.data import ViewShape, encode_views, training_views
from dreambooth.training.losses import DenoisingBatch, denoising_loss
from dreambooth.images import list_images
from dreambooth.ingest.photos import ingest_subject
from dreambooth.models.loading import resolve_model_source
from dreambooth.super_resolution import fine_tune_upscaler
from dreambooth.training.recipes.upscaler import low_resolution, noised_condition


@pytest.fixture
def subject(make_config, subject_dir, tmp_path):
    config = make_config(training={"random_flip": False})
    result = ingest_subject(subject_dir, tmp_path / "subject", config)
    return tmp_path / "subject", result.identifier.identifier


def _settings(make_config, **superres):
    base = {"training": {"max_steps": 30, "learning_rate": 1e-3, "random_flip": False, "checkpoint_every": 1000},
            "prior_preservation": False}
    return make_config(superres={**base, **superres})


def _held_in_loss(model_dir, subject_dir, identifier, config) -> float:
    """The upscaler's denoising loss on every subject pair, with fixed noise, timesteps and noise levels."""
    pipeline = StableDiffusionUpscalePipeline.from_pretrained(model_dir)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    views = [view.image for view in training_views(list_images(subject_dir), ViewShape(config.superres.resolution), False)]
    latents = encode_views(pipeline.vae, views)
    generator = torch.Generator().manual_seed(0)
    count = len(views)
    sampled = latents.sample(torch.arange(count), generator, pipeline.vae.config.scaling_factor)
    low = low_resolution(views)
    levels = torch.full((count,), 4)
    tokens = pipeline.tokenizer([f"a {identifier} dog"] * count, padding="max_length", max_length=77, return_tensors="pt")
    total = 0.0
    with torch.no_grad():
        embeddings = pipeline.text_encoder(tokens.input_ids)[0]
        for timestep in (100, 400, 700):
            batch = DenoisingBatch(
                latents=sampled,
                noise=torch.randn(sampled.shape, generator=generator),
                timesteps=torch.full((count,), timestep),
                embeddings=embeddings,
                num_instance=count,
                condition=noised_condition(low, torch.randn(low.shape, generator=generator), levels, pipeline.low_res_scheduler),
                denoiser_kwargs={"class_labels": levels},
            )
            total += denoising_loss(pipeline.unet, scheduler, batch, 0.0).total.item()
    return total / 3


def test_fine_tuning_lowers_the_denoising_loss_on_subject_pairs(subject, make_config, tmp_path):
    subject_dir, identifier = subject
    config = _settings(make_config)
    before = _held_in_loss(resolve_model_source("tiny://sd-upscaler"), subject_dir, identifier, config)
    result = fine_tune_upscaler(subject_dir, None, identifier, config, tmp_path / "upscaler")
    after = _held_in_loss(tmp_path / "upscaler", subject_dir, identifier, config)
    assert result.steps == 30
    assert after < 0.9 * before, (before, after)


def test_the_configured_noise_level_is_the_one_applied_to_the_condition(subject, make_config, tmp_path):
    """Watch the UNet during real training: its class labels and the noise in its condition channels."""
    subject_dir, identifier = subject
    level = 50
    config = _settings(make_config, train_noise_levels=(level, level), training={"max_steps": 2, "random_flip": False})
    seen_labels, seen_conditions = [], []

    def watch(module, inputs):
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings == 1000:
            seen_labels.append(inputs[0].clone())
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 7:
            seen_conditions.append(inputs[0][:, 4:].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(watch)
    try:
        fine_tune_upscaler(subject_dir, None, identifier, config, tmp_path / "upscaler")
    finally:
        handle.remove()

    assert seen_labels and all(torch.equal(labels, torch.full_like(labels, level)) for labels in seen_labels)
    # condition = sqrt(a) * low + sqrt(1 - a) * eps at the level's a: recover eps against each subject view.
    alpha = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).alphas_cumprod[level]
    lows = low_resolution([view.image for view in training_views(list_images(subject_dir), ViewShape(config.superres.resolution), False)])
    for condition in seen_conditions[0]:
        recovered = [(condition - alpha.sqrt() * low) / (1 - alpha).sqrt() for low in lows]
        best = min(recovered, key=lambda eps: abs(eps.std().item() - 1.0))
        assert best.std().item() == pytest.approx(1.0, abs=0.12)  # unit Gaussian noise at exactly that level
        assert abs(best.mean().item()) < 0.15


def test_the_output_loads_as_an_upscaler_and_upscales(subject, make_config, tmp_path):
    subject_dir, identifier = subject
    fine_tune_upscaler(subject_dir, None, identifier, _settings(make_config, training={"max_steps": 2}), tmp_path / "upscaler")
    pipeline = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "upscaler")
    image = pipeline(f"a {identifier} dog", image=Image.new("RGB", (16, 16), "white"), num_inference_steps=2, noise_level=5).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_upscaling_keeps_each_image_at_four_times_its_own_size(model_cache):
    from dreambooth.config import SamplerSettings
    from dreambooth.super_resolution import load_upscaler, upscale

    pipeline = load_upscaler("tiny://sd-upscaler")
    images = [Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue"), Image.new("RGB", (24, 24), "green")]
    sampler = SamplerSettings(scheduler="DDIMScheduler", num_inference_steps=2, batch_size=4)
    upscaled = upscale(pipeline, ["a dog"] * 3, images, noise_level=5, sampler=sampler)
    assert [image.size for image in upscaled] == [(64, 64), (64, 64), (96, 96)]


def test_an_empty_class_folder_is_refused_like_the_base_fine_tune_refuses_it(subject, make_config, tmp_path):
    from dreambooth.errors import InputError

    subject_dir, identifier = subject
    (tmp_path / "no-classes").mkdir()
    config = _settings(make_config, prior_preservation=True)
    with pytest.raises(InputError, match=r"no-classes: no class images for prior preservation \(superres.prior_preservation is true\)"):
        fine_tune_upscaler(subject_dir, tmp_path / "no-classes", identifier, config, tmp_path / "upscaler")
