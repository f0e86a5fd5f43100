"""Model-family recipes: each conditions its denoiser as the family's own pipeline does at inference,
and Flux's flow-matching loss equals an independent computation."""

import numpy as np
import pytest
import torch

from dreambooth.config import TrainingSettings
from dreambooth.errors import InputError
from dreambooth.ingest.identifiers import check_user_identifier, select_rare_identifier
from dreambooth.models.loading import load_pipeline, model_family, use_sampler
from dreambooth.models.tiny import build_tiny_t5_tokenizer
from dreambooth.training.recipes import recipe_class

PROMPTS = ["a fqs dog", "a fqs dog", "a dog", "a dog"]  # 2 subject + 2 class examples


@pytest.fixture(scope="module")
def sdxl():
    return load_pipeline("tiny://sdxl", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def flux():
    return load_pipeline("tiny://flux", device=torch.device("cpu"))


def test_the_family_comes_from_model_index_and_a_wrong_declaration_is_refused():
    assert [model_family(f"tiny://{name}") for name in ("sd", "sdxl", "flux")] == ["sd", "sdxl", "flux"]
    with pytest.raises(InputError, match="model.family: sd, but 'tiny://flux' is a flux model"):
        model_family("tiny://flux", declared="sd")


def test_sdxl_conditioning_is_what_its_pipeline_gives_the_unet(sdxl):
    recipe = recipe_class("sdxl")(sdxl, TrainingSettings(method="lora"), torch.device("cpu"), resolution=64)
    with torch.no_grad():
        ours = recipe.encode_prompts({}, PROMPTS)
        embeds, _, pooled, _ = sdxl.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(ours["embeddings"], embeds, atol=1e-6)  # both encoders' penultimate states, side by side
    assert torch.allclose(ours["text_embeds"], pooled, atol=1e-6)


def test_flux_conditioning_is_what_its_pipeline_gives_the_transformer(flux):
    recipe = recipe_class("flux")(flux, TrainingSettings(method="lora"), torch.device("cpu"), resolution=64)
    with torch.no_grad():
        ours = recipe.encode_prompts({}, PROMPTS)
        embeds, pooled, text_ids = flux.encode_prompt(PROMPTS, prompt_2=None, device="cpu")
    assert torch.allclose(ours["embeddings"], embeds, atol=1e-6)  # T5, at the pipeline's sequence length
    assert torch.allclose(ours["pooled"], pooled, atol=1e-6)  # CLIP's pooled output
    assert torch.equal(ours["text_ids"], text_ids)


def _pack(latent: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H/2 * W/2, 4C): each 2x2 patch of every channel as one token, as Flux reads latents."""
    c, h, w = latent.shape
    return latent.reshape(c, h // 2, 2, w // 2, 2).transpose(1, 3, 0, 2, 4).reshape(h // 2 * w // 2, c * 4)


def _unpack(tokens: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    return tokens.reshape(h // 2, w // 2, c, 2, 2).transpose(2, 0, 3, 1, 4).reshape(c, h, w)


@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_flux_flow_matching_loss_matches_an_independent_computation(flux, prior_weight):
    settings = TrainingSettings(method="lora", prior_loss_weight=prior_weight, guidance_scale=3.5)
    recipe = recipe_class("flux")(flux, settings, torch.device("cpu"), resolution=64)
    transformer = flux.transformer.eval()
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conditioning = recipe.encode_prompts({}, PROMPTS)
        terms = recipe.loss({"transformer": transformer}, latents, None, conditioning, 2, torch.Generator().manual_seed(5))

    # The same draws, in the same order: noise, then one uniform number per example.
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator).double().numpy()
    sigmas = (torch.rand(4, generator=generator) * 1000).long().clamp(max=999)
    sigmas = flux.scheduler.timesteps[sigmas].double().numpy() / 1000  # dynamic shifting: unshifted at training
    errors = []
    ids = np.stack(np.meshgrid(np.arange(16), np.arange(16), indexing="ij"), -1).reshape(-1, 2)
    image_ids = torch.from_numpy(np.concatenate([np.zeros((256, 1)), ids], axis=1)).float()
    for i in range(4):
        x = latents[i].double().numpy()
        noisy = (1 - sigmas[i]) * x + sigmas[i] * noise[i]  # the straight path from data to noise
        with torch.no_grad():
            tokens = transformer(
                hidden_states=torch.from_numpy(_pack(noisy)).float()[None],
                timestep=torch.tensor([sigmas[i]], dtype=torch.float32),
                guidance=torch.tensor([3.5]),
                pooled_projections=conditioning["pooled"][i : i + 1],
                encoder_hidden_states=conditioning["embeddings"][i : i + 1],
                txt_ids=conditioning["text_ids"],
                img_ids=image_ids,
            ).sample[0].double().numpy()
        errors.append(np.mean((_unpack(tokens, 4, 32, 32) - (noise[i] - x)) ** 2))  # target: the velocity noise - x
    assert terms.instance.item() == pytest.approx(np.mean(errors[:2]), rel=1e-4)
    assert terms.prior.item() == pytest.approx(np.mean(errors[2:]), rel=1e-4)
    assert terms.total.item() == pytest.approx(np.mean(errors[:2]) + prior_weight * np.mean(errors[2:]), rel=1e-4)


def test_flux_trains_lora_only_and_refuses_min_snr(flux):
    with pytest.raises(InputError, match="training.method: full is not available for flux"):
        recipe_class("flux")(flux, TrainingSettings(method="full"), torch.device("cpu"))
    with pytest.raises(InputError, match="training.snr_gamma"):
        recipe_class("flux")(flux, TrainingSettings(method="lora", snr_gamma=5.0), torch.device("cpu"))


def test_a_sampler_that_cannot_draw_the_model_is_refused(flux):
    with pytest.raises(InputError, match="sampler.scheduler: DPMSolverMultistepScheduler cannot sample this model"):
        use_sampler(flux, "DPMSolverMultistepScheduler")
    use_sampler(flux, "FlowMatchEulerDiscreteScheduler")


def test_an_identifier_must_be_short_in_every_tokenizer_the_model_reads(sdxl):
    check_user_identifier(sdxl.tokenizer, "fqs", "dog", (sdxl.tokenizer_2,))
    with pytest.raises(InputError, match="tokenizer 2; use 1-3 tokens"):
        check_user_identifier(sdxl.tokenizer, "fqs", "dog", (build_tiny_t5_tokenizer(),))  # f, q, s and a word start


def test_a_rare_token_is_picked_only_if_every_tokenizer_reads_it_as_one_token(sdxl):
    picked = select_rare_identifier(sdxl.tokenizer, "dog", [], (700, 1050), other_tokenizers=(sdxl.tokenizer_2,))
    assert len(sdxl.tokenizer_2(picked.identifier, add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(InputError, match="holds 0 usable rare tokens"):  # T5 spells every rare word in pieces
        select_rare_identifier(sdxl.tokenizer, "dog", [], (700, 1050), other_tokenizers=(build_tiny_t5_tokenizer(),))


def test_flux_latents_are_packed_as_diffusers_flux_pipeline_packs_them():
    """The recipe packs latents itself; this fails when diffusers' (private) layout moves away from it."""
    from diffusers import FluxPipeline

    from dreambooth.training.recipes.flux import latent_token_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), latents)
    assert torch.equal(unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 8 * 8, 12 * 8, 8))
    assert torch.equal(latent_token_ids(8, 12, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


@pytest.fixture(scope="module")
def sd3():
    return load_pipeline("tiny://sd3", device=torch.device("cpu"))


def test_sd3_conditioning_is_what_its_pipeline_gives_the_transformer(sd3):
    recipe = recipe_class("sd3")(sd3, TrainingSettings(method="lora"), torch.device("cpu"), resolution=64)
    with torch.no_grad():
        ours = recipe.encode_prompts({}, PROMPTS)
        embeds, _, pooled, _ = sd3.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(ours["embeddings"], embeds, atol=1e-6)  # CLIPs padded to T5's width, then T5's 256 states
    assert torch.allclose(ours["pooled"], pooled, atol=1e-6)


@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_sd3_preconditioned_flow_loss_matches_an_independent_computation(sd3, prior_weight):
    settings = TrainingSettings(method="lora", prior_loss_weight=prior_weight)
    recipe = recipe_class("sd3")(sd3, settings, torch.device("cpu"), resolution=64)
    transformer = sd3.transformer.eval()
    latents = torch.randn(4, 4, 32, 24, generator=torch.Generator().manual_seed(1))  # a 2 x 4 batch of a tall bucket
    with torch.no_grad():
        conditioning = recipe.encode_prompts({}, PROMPTS)
        terms = recipe.loss({"transformer": transformer}, latents, None, conditioning, 2, torch.Generator().manual_seed(5))

    # The draws in the same order: noise, then a logit-normal number per example; diffusers' script looks
    # each timestep's sigma up in the scheduler, and scores x_t - sigma * v against the sample.
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator).double().numpy()
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(4,), generator=generator))
    indices = (u * 1000).long().clamp(max=999)
    timesteps, sigmas = sd3.scheduler.timesteps[indices], sd3.scheduler.sigmas[indices].double().numpy()
    errors = []
    for i in range(4):
        x = latents[i].double().numpy()
        noisy = (1 - sigmas[i]) * x + sigmas[i] * noise[i]
        with torch.no_grad():
            velocity = transformer(hidden_states=torch.from_numpy(noisy).float()[None], timestep=timesteps[i : i + 1],
                                   encoder_hidden_states=conditioning["embeddings"][i : i + 1],
                                   pooled_projections=conditioning["pooled"][i : i + 1]).sample[0].double().numpy()
        errors.append(np.mean((noisy - sigmas[i] * velocity - x) ** 2))
    assert terms.instance.item() == pytest.approx(np.mean(errors[:2]), rel=1e-4)
    assert terms.prior.item() == pytest.approx(np.mean(errors[2:]), rel=1e-4)
    assert terms.total.item() == pytest.approx(np.mean(errors[:2]) + prior_weight * np.mean(errors[2:]), rel=1e-4)


@pytest.mark.parametrize("family", ["flux2-klein", "flux2", "z-image", "qwen-image"])
def test_the_language_model_families_are_read_and_train_lora_with_the_encoder_frozen(family):
    """FLUX.2 [klein] and [dev], Z-Image and Qwen-Image: LoRA on the transformer, the 4-24B text encoder never trains."""
    pipeline = load_pipeline(f"tiny://{family}", device=torch.device("cpu"))
    assert model_family(f"tiny://{family}") == family
    with pytest.raises(InputError, match=f"training.method: full is not available for {family}"):
        recipe_class(family)(pipeline, TrainingSettings(method="full"), torch.device("cpu"))
    with pytest.raises(InputError, match=f"training.train_text_encoder: {family} models train with their text encoder frozen"):
        recipe_class(family)(pipeline, TrainingSettings(method="lora", train_text_encoder=True), torch.device("cpu"))
