"""The fine-tune driver's data: each photo's caption reaches the text encoder, and caption dropout
swaps in the bare instance prompt for the share of examples it states."""

from collections import Counter

import pytest

from dreambooth.fine_tune import fine_tune
from dreambooth.ingest.photos import ingest_subject
from dreambooth.training.recipes.sd import StableDiffusionRecipe

DROPOUT, TOLERANCE = 0.3, 0.12  # 80 subject examples: the share's standard deviation is about 0.05


def test_each_photo_caption_reaches_the_text_encoder_and_dropout_swaps_in_the_bare_prompt(subject_dir, tmp_path, make_config, monkeypatch):
    places = ["on a red sofa", "in the snow", "on a beach", "under a table"]
    photos = sorted(path.name for path in subject_dir.iterdir())
    captions = {name: f"a photo of {{identifier}} {{class_noun}} {place}" for name, place in zip(photos, places)}
    config = make_config(subject={"captions": captions},
                         training={"method": "lora", "train_text_encoder": True, "max_steps": 40, "batch_size": 2,
                                   "caption_dropout": DROPOUT, "checkpoint_every": 1000},
                         priors={"enabled": False})
    ingested = ingest_subject(subject_dir, tmp_path / "subject", config)
    identifier = ingested.identifier.identifier
    expected = {f"a photo of {identifier} dog {place}" for place in places}

    encoded = Counter()  # every prompt the text encoder was given, while training
    original = StableDiffusionRecipe.encode_prompts

    def recording(self, modules, prompts):
        encoded.update(prompts)
        return original(self, modules, prompts)

    monkeypatch.setattr(StableDiffusionRecipe, "encode_prompts", recording)
    result = fine_tune(tmp_path / "subject", None, identifier, config, tmp_path / "model")

    bare = ingested.instance_prompt
    assert set(encoded) == expected | {bare}  # every caption, and the bare prompt, nothing else
    assert encoded == Counter(result.prompts)  # what the run logs is what the encoder saw
    assert abs(encoded[bare] / sum(encoded.values()) - DROPOUT) <= TOLERANCE


@pytest.mark.parametrize("family", ["sd3", "flux2-klein", "flux2", "z-image", "qwen-image"])
def test_in_a_batch_of_two_each_example_keeps_its_prompt_and_the_class_half_the_class_prompt(family, subject_dir, tmp_path, make_config, monkeypatch):
    """The halves stay aligned (diffusers' scripts have repeated class rows with `repeat` where
    `repeat_interleave` was meant, and encoded class prompts as instance prompts)."""
    import torch
    from PIL import Image

    from dreambooth.training import driver
    from dreambooth.training.recipes import recipe_class

    recipe_type = recipe_class(family)

    classes = tmp_path / "classes"
    classes.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (index * 80, 60, 60)).save(classes / f"{index}.png")
    places = ["on a red sofa", "in the snow", "on a beach", "under a table"]
    photos = sorted(path.name for path in subject_dir.iterdir())
    config = make_config(model={"base": f"tiny://{family}", "resolution": 64},
                         subject={"captions": {name: f"a {{identifier}} {{class_noun}} {place}" for name, place in zip(photos, places)}},
                         priors={"class_images": str(classes)}, training={"method": "lora", "max_steps": 3, "batch_size": 2})
    ingested = ingest_subject(subject_dir, tmp_path / "subject", config)

    drawn, seen = [], []
    original_draw, original_loss = driver.SubjectCaptions.draw, recipe_type.loss

    def draw(self, *args):
        prompts = original_draw(self, *args)
        drawn.append(list(prompts))  # the driver appends the class prompts to its list
        return prompts

    def loss(self, modules, latents, extras, conditioning, num_instance, generator):
        seen.append((self, {name: value.detach().clone() for name, value in conditioning.items()}, num_instance))
        return original_loss(self, modules, latents, extras, conditioning, num_instance, generator)

    monkeypatch.setattr(driver.SubjectCaptions, "draw", draw)
    monkeypatch.setattr(recipe_type, "loss", loss)
    fine_tune(tmp_path / "subject", classes, ingested.identifier.identifier, config, tmp_path / "model")

    assert len(seen) == 3 and all(num_instance == 2 for _, _, num_instance in seen)
    for prompts, (recipe, conditioning, _) in zip(drawn, seen):
        expected = prompts + [config.subject.class_prompt()] * 2
        with torch.no_grad():
            for row, prompt in enumerate(expected):  # each row is its own prompt's, encoded alone
                alone = recipe.encode_prompts({}, [prompt])
                for name, value in alone.items():
                    ours = conditioning[name][row]
                    if ours.shape != value[0].shape:  # Qwen-Image pads a batch to its longest prompt, masked
                        assert not ours[value.shape[1]:].any()
                        ours = ours[: value.shape[1]]
                    assert torch.allclose(ours, value[0], atol=1e-5), (name, row)
