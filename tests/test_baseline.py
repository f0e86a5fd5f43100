"""The zero-shot baseline: its result folder names a reference-image pipeline and holds the photos,
and loading it gives a pipeline that draws from those photos with every prompt."""

import json

import numpy as np
import pytest
from PIL import Image

from dreambooth.config import SamplerSettings
from dreambooth.errors import InputError
from dreambooth.generation import generate, load_sampling_pipeline
from dreambooth.ingest.photos import ingest_subject
from dreambooth.models.loading import METADATA_FILE
from dreambooth.baseline import REFERENCES_DIR, write_baseline_result

BASELINE = {"model": {"base": "tiny://flux2-klein", "reference": "tiny://flux2-klein", "resolution": 64},
            "training": {"method": "reference"}, "priors": {"enabled": False}}


def test_a_baseline_draws_from_its_photos_with_every_prompt(subject_dir, tmp_path, make_config):
    config = make_config(**BASELINE)
    ingested = ingest_subject(subject_dir, tmp_path / "subject", config)
    assert ingested.identifier.identifier == "" and ingested.instance_prompt == "a dog"  # no token: the photos say which dog

    result = write_baseline_result(tmp_path / "subject", config, tmp_path / "model")
    metadata = json.loads((tmp_path / "model" / METADATA_FILE).read_text())
    assert (result.steps, metadata["method"], metadata["base_model"]) == (0, "reference", "tiny://flux2-klein")
    references = [Image.open(tmp_path / "model" / REFERENCES_DIR / name) for name in metadata["references"]]
    assert len(references) == 3  # model.reference_images
    assert all(abs(image.width * image.height - 64 * 64) < 64 * 4 for image in references)  # shrunk to the drawing's area

    sampler = SamplerSettings(scheduler="FlowMatchEulerDiscreteScheduler", num_inference_steps=2, guidance_scale=4.0)
    baseline = load_sampling_pipeline(str(tmp_path / "model"), sampler)
    plain = load_sampling_pipeline("tiny://flux2-klein", sampler)
    request = [("a dog on the beach", 7)]
    with_photos = np.asarray(generate(baseline, request, sampler, 64)[0], dtype=float)
    without = np.asarray(generate(plain, request, sampler, 64)[0], dtype=float)
    assert with_photos.shape == without.shape == (64, 64, 3)
    assert np.abs(with_photos - without).max() > 1  # the photos reached the transformer


def test_a_pipeline_that_takes_no_reference_images_is_refused_in_one_line(subject_dir, tmp_path, make_config):
    config = make_config(**{**BASELINE, "model": {"reference": "tiny://sd"}})
    with pytest.raises(InputError) as caught:
        ingest_subject(subject_dir, tmp_path / "subject", config)
    assert str(caught.value).startswith("model.reference: 'tiny://sd' is a StableDiffusionPipeline, which takes no reference images")
