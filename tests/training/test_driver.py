"""The fine-tune driver's data: each photo's caption reaches the text encoder, and caption dropout
swaps in the bare instance prompt for the share of examples it states."""

from collections import Counter

from dreambooth.finetune import finetune
from dreambooth.ingest import ingest_subject
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
    result = finetune(tmp_path / "subject", None, identifier, config, tmp_path / "model")

    bare = ingested.instance_prompt
    assert set(encoded) == expected | {bare}  # every caption, and the bare prompt, nothing else
    assert encoded == Counter(result.prompts)  # what the run logs is what the encoder saw
    assert abs(encoded[bare] / sum(encoded.values()) - DROPOUT) <= TOLERANCE
