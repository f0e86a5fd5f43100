"""Z-Image: the recipe conditions as ZImagePipeline does at inference, and its flow-matching loss (the
transformer's negated output against noise - x) equals an independent computation."""

import numpy as np
import pytest
import torch

from dreambooth.config import TrainingSettings
from dreambooth.models.loading import load_pipeline
from dreambooth.training.recipes import recipe_class

PROMPTS = ["a fqs dog", "a fqs dog on the beach in the snow", "a dog", "a dog"]  # 2 subject + 2 class examples
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def z_image():
    return load_pipeline("tiny://z-image", device=CPU)


def test_conditioning_is_what_its_pipeline_gives_the_transformer(z_image):
    """Each prompt's own tokens (their count differs), the chat-wrapped prompt's second-to-last states."""
    recipe = recipe_class("z-image")(z_image, TrainingSettings(method="lora"), CPU, resolution=64)
    with torch.no_grad():
        ours = recipe.encode_prompts({}, PROMPTS)
        theirs, _ = z_image.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)
    assert [len(states) for states in theirs] == ours["lengths"].tolist() and len(set(ours["lengths"].tolist())) == 3
    for row, states in enumerate(theirs):
        assert torch.allclose(ours["embeddings"][row, : len(states)], states, atol=1e-6)


@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_flow_matching_loss_matches_an_independent_computation(z_image, prior_weight):
    settings = TrainingSettings(method="lora", prior_loss_weight=prior_weight)
    recipe = recipe_class("z-image")(z_image, settings, CPU, resolution=64)
    transformer = z_image.transformer.eval()
    latents = torch.randn(4, 4, 32, 24, generator=torch.Generator().manual_seed(1))  # a 2 x 2 batch of a tall bucket
    with torch.no_grad():
        conditioning = recipe.encode_prompts({}, PROMPTS)
        terms = recipe.loss({"transformer": transformer}, latents, None, conditioning, 2, torch.Generator().manual_seed(5))
        theirs, _ = z_image.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)

    # The draws in the same order: noise, then one uniform number per example; the script looks each
    # timestep's sigma up in the scheduler and gives the transformer (1000 - t) / 1000.
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator).double().numpy()
    indices = (torch.rand(4, generator=generator) * 1000).long().clamp(max=999)
    timesteps, sigmas = z_image.scheduler.timesteps[indices], z_image.scheduler.sigmas[indices].double().numpy()
    errors = []
    for i in range(4):
        x = latents[i].double().numpy()
        noisy = torch.from_numpy((1 - sigmas[i]) * x + sigmas[i] * noise[i]).float()
        with torch.no_grad():
            (output,) = transformer([noisy[:, None]], (1000 - timesteps[i : i + 1]) / 1000, [theirs[i]], return_dict=False)[0]
        velocity = -output[:, 0].double().numpy()  # Z-Image predicts x - noise
        errors.append(np.mean((velocity - (noise[i] - x)) ** 2))
    assert terms.instance.item() == pytest.approx(np.mean(errors[:2]), rel=1e-4)
    assert terms.prior.item() == pytest.approx(np.mean(errors[2:]), rel=1e-4)
    assert terms.total.item() == pytest.approx(np.mean(errors[:2]) + prior_weight * np.mean(errors[2:]), rel=1e-4)
