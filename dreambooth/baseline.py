"""The zero-shot baseline (training.method reference): nothing trains; a reference-image pipeline
(model.reference: FLUX.2 [klein] or [dev], FLUX.1 Kontext, Qwen-Image-Edit) is given the subject's
photos with every prompt.

Its result folder holds those photos and a dreambooth.json naming the pipeline, so it loads, samples,
is evaluated on the same DreamBench protocol, compared and registered like a fine-tuned model: whether
fine-tuning is worth its GPU time becomes a measured answer per subject (evaluation.gate.against
reference). Its prompts carry no identifier (`a dog on the beach`): the photos say which dog.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from PIL import Image

from dreambooth.config import RunConfig
from dreambooth.errors import InputError
from dreambooth.images import list_images
from dreambooth.models.loading import METADATA_FILE, REFERENCE_PIPELINES, REFERENCES_DIR, pipeline_class_name, result_metadata
from dreambooth.training.saving import FineTuneResult

METHOD = "reference"
REFERENCE_SIDE = 1024  # these pipelines draw at about 1024 x 1024 and shrink larger references to that area


def reference_view(image: Image.Image, side: int) -> Image.Image:
    """The photo at about side x side pixels in area, its aspect ratio kept: a reference costs the
    transformer as many tokens as the image it draws, not as many as the camera took."""
    scale = min(1.0, side / (image.width * image.height) ** 0.5)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def check_reference_pipeline(config: RunConfig) -> None:
    """InputError unless model.reference is a pipeline that draws from reference images."""
    reference = config.model.reference
    name = pipeline_class_name(reference, setting="model.reference")
    if name not in REFERENCE_PIPELINES:
        raise InputError(f"model.reference: {reference!r} is a {name}, which takes no reference images "
                         f"(reference-image pipelines: {', '.join(REFERENCE_PIPELINES)})")


def is_reference_result(folder: str | Path) -> bool:
    return result_metadata(folder).get("method") == METHOD


def write_baseline_result(instance_dir: Path, config: RunConfig, output_dir: Path) -> FineTuneResult:
    """The baseline's 'model': the first model.reference_images photos and the pipeline that draws from them."""
    started = time.perf_counter()
    check_reference_pipeline(config)
    photos = list_images(instance_dir)[: config.model.reference_images]
    if not photos:
        raise InputError(f"{instance_dir}: no subject photos to draw from")
    folder = output_dir / REFERENCES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    side = config.model.resolution or REFERENCE_SIDE
    for photo in photos:
        with Image.open(photo) as image:
            reference_view(image, side).save(folder / f"{photo.stem}.png")
    metadata = {
        "method": METHOD,
        "identifier": "",
        "class_noun": config.subject.class_noun,
        "base_model": config.model.reference,
        "base_revision": None,
        "pipeline": pipeline_class_name(config.model.reference),
        "references": [f"{photo.stem}.png" for photo in photos],
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return FineTuneResult(model_dir=str(output_dir), steps=0, resumed_from_step=0, steps_per_second=0.0, images_per_second=0.0,
                          seconds=time.perf_counter() - started, final_loss={})


def base_of(folder: str | Path) -> Optional[str]:
    """The reference pipeline a baseline result draws with (None: not a baseline result)."""
    metadata = result_metadata(folder)
    return metadata["base_model"] if metadata.get("method") == METHOD else None
