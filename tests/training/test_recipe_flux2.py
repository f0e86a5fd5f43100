"""FLUX.2 [klein] and [dev]: each recipe conditions and encodes as its pipeline (Flux2KleinPipeline,
Flux2Pipeline) does at inference, and its flow-matching loss equals an independent computation."""

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.config import DataSettings, TrainingSettings
from dreambooth.ingest.identifiers import select_rare_identifier
from dreambooth.models.loading import load_pipeline
from dreambooth.training.recipes import recipe_class

PROMPTS = ["a fqs dog", "a fqs dog on the beach", "a dog", "a dog"]  # 2 subject + 2 class examples
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["flux2-klein", "flux2"])
def klein(request):
    """The family's tiny pipeline; the tests read it as `klein.family` and the pipeline."""
    pipeline = load_pipeline(f"tiny://{request.param}", device=CPU)
    pipeline.family = request.param
    return pipeline


def test_the_identifier_is_one_rare_word_token_of_the_byte_level_vocabulary(klein):
    picked = select_rare_identifier(klein.tokenizer, "dog", ["a photo of {identifier} dog"], (700, 1050))
    (token_id,) = picked.token_ids
    assert klein.tokenizer.convert_ids_to_tokens(token_id) == "\u0120" + picked.identifier  # a word after a space
    assert klein.tokenizer(f"a {picked.identifier} dog", add_special_tokens=False).input_ids[1] == token_id


def test_conditioning_is_what_its_pipeline_gives_the_transformer(klein):
    recipe = recipe_class(klein.family)(klein, TrainingSettings(method="lora"), CPU, resolution=64)
    with torch.no_grad():
        ours = recipe.encode_prompts({}, PROMPTS)
        embeds, text_ids = klein.encode_prompt(PROMPTS, device="cpu")
    assert ours["embeddings"].shape == (4, 512, 48)  # the chat-wrapped prompt padded to 512, three layers side by side
    assert ours["embeddings"][0].abs().sum(-1).count_nonzero() == 512  # dev pads too: no layer is all zeros
    assert torch.allclose(ours["embeddings"], embeds, atol=1e-6)
    assert torch.equal(ours["text_ids"], text_ids)


def test_latents_are_what_its_pipeline_encodes_a_reference_image_to(klein, tmp_path):
    """The VAE's mean, patchified and whitened by its batch norm; positions as the pipeline lays them out."""
    from diffusers import Flux2KleinPipeline

    from dreambooth.training.data import pixels
    from dreambooth.training.recipes.flux2 import patchify, position_ids, unpatchify

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photo)
    with torch.no_grad():  # bn statistics of a trained VAE are not 0 and 1
        klein.vae.bn.running_mean.uniform_(-0.5, 0.5)
        klein.vae.bn.running_var.uniform_(0.5, 2.0)
    recipe = recipe_class(klein.family)(klein, TrainingSettings(method="lora", center_crop=True), CPU, resolution=64,
                                        data=DataSettings(buckets=True))
    images = recipe.prepare_images([photo], flips=False)
    group = images.groups[0]
    with torch.no_grad():
        ours, _ = recipe.sample(images, torch.tensor([0]), torch.Generator().manual_seed(0))
        theirs = klein._encode_vae_image(pixels([group.views[0].image]), generator=None)
    assert group.size[0] > group.size[1] and torch.allclose(ours, theirs, atol=1e-5)  # a wide bucket

    latents = torch.randn(2, 4, 8, 12)
    assert torch.equal(patchify(latents), Flux2KleinPipeline._patchify_latents(latents))
    assert torch.equal(unpatchify(patchify(latents)), latents)
    patched = patchify(latents)
    assert torch.equal(position_ids(2, 1, 4, 6, 1, "cpu"), Flux2KleinPipeline._prepare_latent_ids(patched))


@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_flow_matching_loss_matches_an_independent_computation(klein, prior_weight):
    from diffusers import Flux2KleinPipeline

    settings = TrainingSettings(method="lora", prior_loss_weight=prior_weight, guidance_scale=2.5)
    recipe = recipe_class(klein.family)(klein, settings, CPU, resolution=64)
    transformer = klein.transformer.eval()
    latents = torch.randn(4, 16, 12, 8, generator=torch.Generator().manual_seed(1))  # patchified latents of a tall bucket
    with torch.no_grad():
        conditioning = recipe.encode_prompts({}, PROMPTS)
        terms = recipe.loss({"transformer": transformer}, latents, None, conditioning, 2, torch.Generator().manual_seed(5))

    # The draws in the same order: noise, then one uniform number per example; the script looks each
    # timestep's sigma up in the scheduler (dynamic shifting: unshifted while training).
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator).double().numpy()
    indices = (torch.rand(4, generator=generator) * 1000).long().clamp(max=999)
    sigmas = klein.scheduler.sigmas[indices].double().numpy()
    # [dev] is guidance-distilled: its transformer is told the training guidance scale; klein has no embedding.
    guidance = torch.tensor([2.5]) if klein.family == "flux2" else None
    errors = []
    for i in range(4):
        x = latents[i].double().numpy()
        noisy = torch.from_numpy((1 - sigmas[i]) * x + sigmas[i] * noise[i]).float()[None]
        ids = Flux2KleinPipeline._prepare_latent_ids(noisy)
        with torch.no_grad():
            tokens = transformer(hidden_states=Flux2KleinPipeline._pack_latents(noisy), timestep=torch.tensor([sigmas[i]]).float(),
                                 guidance=guidance, encoder_hidden_states=conditioning["embeddings"][i : i + 1],
                                 txt_ids=conditioning["text_ids"][i : i + 1], img_ids=ids).sample
        velocity = Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids)[0].double().numpy()
        errors.append(np.mean((velocity - (noise[i] - x)) ** 2))  # target: the velocity noise - x
    assert terms.instance.item() == pytest.approx(np.mean(errors[:2]), rel=1e-4)
    assert terms.prior.item() == pytest.approx(np.mean(errors[2:]), rel=1e-4)
    assert terms.total.item() == pytest.approx(np.mean(errors[:2]) + prior_weight * np.mean(errors[2:]), rel=1e-4)
