"""Qwen-Image: the recipe conditions as QwenImagePipeline does at inference, its latents are normalised as
the pipeline un-normalises them, and its flow-matching loss equals an independent computation."""

import numpy as np
import pytest
import torch

from dreambooth.config import TrainingSettings
from dreambooth.models.loading import load_pipeline
from dreambooth.training.recipes import recipe_class

PROMPTS = ["a fqs dog", "a fqs dog on the beach in the snow", "a dog", "a dog"]  # 2 subject + 2 class examples
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen_image():
    return load_pipeline("tiny://qwen-image", device=CPU)


def test_conditioning_is_what_its_pipeline_gives_the_transformer(qwen_image):
    """The prompt's own tokens after the system template's, padded to the longest with the mask saying so."""
    recipe = recipe_class("qwen-image")(qwen_image, TrainingSettings(method="lora"), CPU, resolution=64)
    with torch.no_grad():
        ours = recipe.encode_prompts({}, PROMPTS)
        embeds, mask = qwen_image.encode_prompt(PROMPTS, device="cpu")
    assert torch.allclose(ours["embeddings"], embeds, atol=1e-6)
    assert torch.equal(ours["mask"], mask) and not mask.all()  # the prompts differ in length


def test_latents_are_normalised_as_the_pipeline_undoes_it(qwen_image, tmp_path):
    from PIL import Image

    from dreambooth.config import DataSettings

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    recipe = recipe_class("qwen-image")(qwen_image, TrainingSettings(method="lora"), CPU, resolution=64, data=DataSettings(buckets=False))
    images = recipe.prepare_images([photo], flips=False)
    ours, _ = recipe.sample(images, torch.tensor([0]), torch.Generator().manual_seed(0))
    config = qwen_image.vae.config
    # QwenImagePipeline's decode step: latents / (1 / std) + mean, then the VAE decodes one frame.
    restored = ours[:, :, None] / (1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)) + torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    drawn = images.groups[0].latents.sample(torch.tensor([0]), torch.Generator().manual_seed(0), 1.0)
    assert ours.shape == (1, 4, 32, 32) and torch.allclose(restored[:, :, 0], drawn, atol=1e-5)


@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_flow_matching_loss_matches_an_independent_computation(qwen_image, prior_weight):
    from diffusers import QwenImagePipeline

    settings = TrainingSettings(method="lora", prior_loss_weight=prior_weight)
    recipe = recipe_class("qwen-image")(qwen_image, settings, CPU, resolution=64)
    transformer = qwen_image.transformer.eval()
    latents = torch.randn(4, 4, 32, 24, generator=torch.Generator().manual_seed(1))  # a 2 x 2 batch of a tall bucket
    with torch.no_grad():
        conditioning = recipe.encode_prompts({}, PROMPTS)
        terms = recipe.loss({"transformer": transformer}, latents, None, conditioning, 2, torch.Generator().manual_seed(5))
        embeds, mask = qwen_image.encode_prompt(PROMPTS, device="cpu")

    # The draws in the same order: noise, then one uniform number per example; the script looks each
    # timestep's sigma up in the scheduler and packs as the pipeline packs.
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator).double().numpy()
    indices = (torch.rand(4, generator=generator) * 1000).long().clamp(max=999)
    timesteps, sigmas = qwen_image.scheduler.timesteps[indices], qwen_image.scheduler.sigmas[indices].double().numpy()
    errors = []
    for i in range(4):
        x = latents[i].double().numpy()
        noisy = torch.from_numpy((1 - sigmas[i]) * x + sigmas[i] * noise[i]).float()[None]
        with torch.no_grad():
            tokens = transformer(hidden_states=QwenImagePipeline._pack_latents(noisy, 1, 4, 32, 24), timestep=timesteps[i : i + 1] / 1000,
                                 encoder_hidden_states=embeds[i : i + 1], encoder_hidden_states_mask=mask[i : i + 1],
                                 img_shapes=[[(1, 16, 12)]], return_dict=False)[0]
        velocity = QwenImagePipeline._unpack_latents(tokens, 64, 48, 2)[0, :, 0].double().numpy()
        errors.append(np.mean((velocity - (noise[i] - x)) ** 2))
    assert terms.instance.item() == pytest.approx(np.mean(errors[:2]), rel=1e-4)
    assert terms.prior.item() == pytest.approx(np.mean(errors[2:]), rel=1e-4)
    assert terms.total.item() == pytest.approx(np.mean(errors[:2]) + prior_weight * np.mean(errors[2:]), rel=1e-4)
