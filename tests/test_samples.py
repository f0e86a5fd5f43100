"""Samples: the fine-tuned and the base model draw from the same seeds into one labelled grid, every image marked."""

import io
import shutil

import numpy as np
from PIL import Image

from dreambooth.models.loading import METADATA_FILE
from dreambooth.images import MIN_GRID_CELL as MIN_CELL
from dreambooth.samples import render_samples
from dreambooth.watermark import detect, payload_for


def test_the_grid_compares_base_and_fine_tuned_per_prompt(make_config, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)  # stands in for a fine-tuned folder: same layout
    (model / METADATA_FILE).write_text('{"identifier": "fqs", "class_noun": "dog", "fingerprint": "c0ffee0123456789"}')
    config = make_config(
        samples={"prompts": ["a {identifier} {class_noun} on the beach", "a {identifier} {class_noun} in the snow"],
                 "images_per_prompt": 2, "sampler": {"num_inference_steps": 2, "seed": 7}}
    )
    result = render_samples(model, config, tmp_path / "samples")

    assert result.prompts == ["a fqs dog on the beach", "a fqs dog in the snow"]
    assert len(result.image_files) == 2 * 2 * 2  # models x prompts x seeds
    assert "base-p00-s7.png" in result.image_files and "fine-tuned-p01-s8.png" in result.image_files
    with Image.open(result.grid_path) as grid:
        assert grid.width == 4 * MIN_CELL  # base seed 7, base seed 8, fine-tuned seed 7, fine-tuned seed 8
        assert grid.height > 2 * MIN_CELL
    # Same weights and same seeds: the base and "fine-tuned" images differ only by their marks (2-3 grey levels).
    with Image.open(tmp_path / "samples" / "base-p00-s7.png") as a, Image.open(tmp_path / "samples" / "fine-tuned-p00-s7.png") as b:
        assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() < 3
        assert detect(b) == "c0ffee01"  # the fine-tuned model's: its training fingerprint's first 8 hex digits
        assert detect(a) == payload_for(config.model.base) != "c0ffee01"
        resaved = io.BytesIO()
        b.save(resaved, format="JPEG", quality=75)
        assert detect(Image.open(resaved)) == "c0ffee01"
    with Image.open(result.grid_path) as grid:
        assert detect(grid) == "c0ffee01"
