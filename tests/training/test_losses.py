"""The DreamBooth loss on a fixed batch equals the value computed independently, by hand."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from dreambooth.training.losses import DenoisingBatch, denoising_loss, masked_weights, prior_preservation_loss


@pytest.fixture(scope="module")
def unet_and_scheduler(tiny_model_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    return unet, scheduler


@pytest.fixture(scope="module")
def fixed_batch(unet_and_scheduler):
    unet, _ = unet_and_scheduler
    generator = torch.Generator().manual_seed(42)
    size = unet.config.sample_size
    latents = torch.randn(4, 4, size, size, generator=generator)  # 2 subject + 2 class examples
    return DenoisingBatch(
        latents=latents,
        noise=torch.randn(latents.shape, generator=generator),
        timesteps=torch.tensor([10, 500, 250, 999]),
        embeddings=torch.randn(4, 77, unet.config.cross_attention_dim, generator=generator),
        num_instance=2,
    )


def _independent_losses(unet, batch):
    """Forward noising from the scaled-linear schedule by hand; each example through the UNet alone."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    squared_errors = []
    for i in range(batch.latents.shape[0]):
        a = alphas_cumprod[int(batch.timesteps[i])]
        x = batch.latents[i].double().numpy()
        eps = batch.noise[i].double().numpy()
        noisy = np.sqrt(a) * x + np.sqrt(1.0 - a) * eps
        with torch.no_grad():
            predicted = unet(
                torch.from_numpy(noisy).float()[None], batch.timesteps[i : i + 1], batch.embeddings[i : i + 1]
            ).sample[0].double().numpy()
        squared_errors.append((predicted - eps) ** 2)  # epsilon prediction: the target is the noise
    instance = float(np.mean(squared_errors[: batch.num_instance]))
    prior = float(np.mean(squared_errors[batch.num_instance :]))
    return instance, prior


@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_training_loss_matches_an_independent_computation(unet_and_scheduler, fixed_batch, prior_weight):
    unet, scheduler = unet_and_scheduler
    with torch.no_grad():
        terms = denoising_loss(unet, scheduler, fixed_batch, prior_weight)
    instance, prior = _independent_losses(unet, fixed_batch)
    expected_total = instance + prior_weight * prior
    assert terms.instance.item() == pytest.approx(instance, rel=1e-4)
    assert terms.prior.item() == pytest.approx(prior, rel=1e-4)
    assert terms.total.item() == pytest.approx(expected_total, rel=1e-4)
    if prior_weight == 0.0:
        assert terms.total.item() == pytest.approx(instance, rel=1e-4)


def test_prior_weight_scales_only_the_class_half():
    prediction = torch.tensor([[1.0], [1.0], [3.0], [3.0]])
    target = torch.zeros(4, 1)
    terms = prior_preservation_loss(prediction, target, num_instance=2, prior_weight=0.5)
    assert terms.instance.item() == 1.0
    assert terms.prior.item() == 9.0
    assert terms.total.item() == 1.0 + 0.5 * 9.0


def test_without_class_examples_the_loss_is_the_instance_loss():
    terms = prior_preservation_loss(torch.ones(2, 3), torch.zeros(2, 3), num_instance=2, prior_weight=1.0)
    assert terms.prior is None and terms.total.item() == 1.0


def _schedule():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def _predictions(unet, batch, v_prediction=False):
    """Each example through the UNet alone, from noising by hand; returns (prediction, target) per example."""
    alphas_cumprod = _schedule()
    pairs = []
    for i in range(batch.latents.shape[0]):
        a = alphas_cumprod[int(batch.timesteps[i])]
        x, eps = batch.latents[i].double().numpy(), batch.noise[i].double().numpy()
        noisy = np.sqrt(a) * x + np.sqrt(1.0 - a) * eps
        with torch.no_grad():
            predicted = unet(torch.from_numpy(noisy).float()[None], batch.timesteps[i : i + 1], batch.embeddings[i : i + 1]).sample[0]
        target = np.sqrt(a) * eps - np.sqrt(1.0 - a) * x if v_prediction else eps
        pairs.append((predicted.double().numpy(), target, a / (1.0 - a)))
    return pairs


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_with_prior_preservation_weights_each_example_by_its_own_timestep(unet_and_scheduler, fixed_batch, v_prediction):
    unet, scheduler = unet_and_scheduler
    if v_prediction:
        scheduler = DDPMScheduler.from_config({**scheduler.config, "prediction_type": "v_prediction"})
    gamma = 5.0
    with torch.no_grad():
        terms = denoising_loss(unet, scheduler, fixed_batch, prior_weight=1.0, snr_gamma=gamma)
    weighted = []
    for predicted, target, snr in _predictions(unet, fixed_batch, v_prediction):
        weight = min(snr, gamma) / (snr + 1.0 if v_prediction else snr)
        weighted.append(weight * np.mean((predicted - target) ** 2))
    instance, prior = np.mean(weighted[:2]), np.mean(weighted[2:])  # 2 subject + 2 class examples
    assert terms.instance.item() == pytest.approx(instance, rel=1e-4)
    assert terms.prior.item() == pytest.approx(prior, rel=1e-4)
    assert terms.total.item() == pytest.approx(instance + prior, rel=1e-4)
    with torch.no_grad():
        unweighted = denoising_loss(unet, scheduler, fixed_batch, prior_weight=1.0)
    assert unweighted.instance.item() != pytest.approx(instance, rel=1e-2)  # the weights do something


def test_v_prediction_targets_the_velocity(unet_and_scheduler, fixed_batch):
    unet, scheduler = unet_and_scheduler
    velocity = DDPMScheduler.from_config({**scheduler.config, "prediction_type": "v_prediction"})
    with torch.no_grad():
        terms = denoising_loss(unet, velocity, fixed_batch, prior_weight=1.0)
    errors = [np.mean((predicted - target) ** 2) for predicted, target, _ in _predictions(unet, fixed_batch, v_prediction=True)]
    assert terms.instance.item() == pytest.approx(np.mean(errors[:2]), rel=1e-4)
    assert terms.prior.item() == pytest.approx(np.mean(errors[2:]), rel=1e-4)


def test_noise_offset_shifts_each_example_and_channel_by_one_constant():
    latents = torch.zeros(3, 4, 8, 8)
    plain = DenoisingBatch.draw(latents, None, 3, torch.Generator().manual_seed(7), 1000, "cpu")
    offset = DenoisingBatch.draw(latents, None, 3, torch.Generator().manual_seed(7), 1000, "cpu", noise_offset=0.1)
    shift = offset.noise - plain.noise
    assert torch.allclose(shift.flatten(2).std(dim=2), torch.zeros(3, 4), atol=1e-6)
    assert shift.abs().max() > 0.01 and shift.flatten(2)[..., 0].std() > 0.01  # differs between channels


def test_with_mask_weight_zero_a_pixel_outside_the_subject_gets_no_gradient(unet_and_scheduler, fixed_batch):
    unet, scheduler = unet_and_scheduler
    size = fixed_batch.latents.shape[-1]
    mask = torch.zeros(2, 1, size, size)  # the subject examples' masks: a square in the middle
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    predictions = []

    def keep_prediction(module, args, output):
        output.sample.retain_grad()
        predictions.append(output.sample)

    handle = unet.register_forward_hook(keep_prediction)
    try:
        latents = fixed_batch.latents.clone().requires_grad_(True)
        batch = DenoisingBatch(latents, fixed_batch.noise, fixed_batch.timesteps, fixed_batch.embeddings, 2)
        terms = denoising_loss(unet, scheduler, batch, 1.0, pixel_weights=masked_weights(mask, 0.0))
        terms.total.backward()
    finally:
        handle.remove()
    gradient = predictions[0].grad
    assert torch.all(gradient[:2, :, 0, 0] == 0) and torch.all(gradient[:2, :, -1, -1] == 0)  # outside: nothing
    assert torch.all(gradient[:2, :, size // 2, size // 2] != 0)  # on the subject: learns
    assert torch.all(gradient[2:, :, 0, 0] != 0)  # class examples are never masked
    # the subject loss is the squared error's mean over the subject alone
    with torch.no_grad():
        error = (predictions[0][:2] - fixed_batch.noise[:2]) ** 2
    assert terms.instance.item() == pytest.approx(error[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4].mean().item(), rel=1e-5)
    # weight 1 is the unmasked loss
    with torch.no_grad():
        plain = denoising_loss(unet, scheduler, fixed_batch, 1.0)
        weighted = denoising_loss(unet, scheduler, fixed_batch, 1.0, pixel_weights=masked_weights(mask, 1.0))
    assert weighted.total.item() == pytest.approx(plain.total.item(), rel=1e-6)
