"""The metrics on known inputs: identical images, self versus unrelated sets, torchmetrics' CLIPScore."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLE_SUBJECT
from dreambooth.evaluation.encoders import ClipEncoder, DinoEncoder, LpipsDistance
from dreambooth.evaluation.metrics import (
    image_text_similarity,
    mean_distinct_pair_similarity,
    mean_pairwise_similarity,
)
from dreambooth.evaluation.prompts import load_prompts, without_identifier
from dreambooth.images import load_rgb


@pytest.fixture(scope="module")
def dogs(model_cache):
    return [load_rgb(path, 1 << 30).image for path in sorted(SAMPLE_SUBJECT.glob("*.jpg"))]


@pytest.fixture(scope="module")
def noise():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (320, 320, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="module", params=["dino", "clip"])
def image_encoder(request, model_cache):
    return DinoEncoder("tiny://dino") if request.param == "dino" else ClipEncoder("tiny://clip")


def test_identical_images_score_one(image_encoder, dogs):
    real = image_encoder.embed(dogs[:1])
    generated = image_encoder.embed([dogs[0], dogs[0].copy()])
    assert mean_pairwise_similarity(generated, real) == pytest.approx(1.0, abs=1e-6)


def test_a_set_matches_itself_better_than_an_unrelated_set(image_encoder, dogs, noise):
    real = image_encoder.embed(dogs)
    shuffled = image_encoder.embed([dogs[i] for i in (2, 0, 3, 1)])
    unrelated = image_encoder.embed(noise)
    itself = mean_pairwise_similarity(real, real)
    assert mean_pairwise_similarity(shuffled, real) == pytest.approx(itself, abs=1e-6)  # order does not matter
    assert itself > mean_pairwise_similarity(unrelated, real)


def test_the_real_image_row_uses_distinct_pairs_only():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert mean_distinct_pair_similarity(embeddings) == pytest.approx(0.0)  # self-pairs (1.0) excluded
    assert mean_pairwise_similarity(embeddings, embeddings) == pytest.approx(0.5)


def test_identical_images_have_zero_diversity(model_cache, dogs):
    lpips = LpipsDistance("tiny://lpips")
    same = lpips.pairwise([(dogs[0], dogs[0].copy()), (dogs[1], dogs[1])])
    different = lpips.pairwise([(dogs[0], dogs[1])])
    assert torch.equal(same, torch.zeros(2))
    assert different.item() > 0


class _TensorFeaturesClip(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors, as transformers 4 did; transformers 5
    returns a model output whose pooler_output is that tensor. Same weights, same numbers."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_t_agrees_with_torchmetrics_clipscore(model_cache, dogs):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    clip = ClipEncoder("tiny://clip")
    # Photos of different shapes and sizes: the encoder's own resize, crop and normalisation are compared too.
    images = [image.crop((0, 0, 320 - 40 * i, 320)).resize((300 + 50 * i, 260 + 30 * i), Image.Resampling.BICUBIC)
              for i, image in enumerate(dogs)]
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(clip.source), tokenizer=clip.tokenizer)
    expected_pixels = processor.image_processor(images=images, return_tensors="pt").pixel_values
    torch.testing.assert_close(clip.preprocessing(images), expected_pixels, atol=1e-4, rtol=0)
    prompts = ["a dog on the beach", "a dog in the snow", "a red dog", "a dog wearing a santa hat"]
    ours = image_text_similarity(clip.embed(images), clip.embed_texts(prompts))
    assert (ours > 0).any()  # CLIPScore clamps negatives to 0: at least one pair must test the value itself

    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeaturesClip(clip.model), processor))
    for image, prompt, cosine in zip(images, prompts, ours):
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        reference = metric(pixels, prompt).item()
        metric.reset()
        assert reference == pytest.approx(100 * max(cosine.item(), 0.0), abs=1e-3)


def test_the_identifier_is_removed_from_clip_t_text():
    assert without_identifier("a fqs dog on the beach", "fqs") == "a dog on the beach"
    assert without_identifier("a red fqs dog", "fqs") == "a red dog"
    assert without_identifier("a fqsx dog", "fqs") == "a fqsx dog"


def test_prompt_sets_follow_dreambench():
    live, objects = load_prompts("dog"), load_prompts("teapot")
    count = lambda prompts, c: sum(p.category == c for p in prompts)  # noqa: E731
    assert (len(live), count(live, "recontextualization"), count(live, "accessorization"), count(live, "property")) == (25, 10, 10, 5)
    assert (len(objects), count(objects, "recontextualization"), count(objects, "property")) == (25, 20, 5)
    assert all(p.template.startswith("a ") and "{identifier} {class_noun}" in p.template for p in live + objects)


def test_a_clip_model_without_its_preprocessing_settings_is_refused(model_cache, tmp_path):
    import shutil

    from dreambooth.errors import InputError

    source = ClipEncoder("tiny://clip").source
    shutil.copytree(source, tmp_path / "clip", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    with pytest.raises(InputError, match="evaluation.clip_model: .* has no readable preprocessor_config.json"):
        ClipEncoder(str(tmp_path / "clip"))
