"""Stage 4: sample images of the subject in new contexts, fine-tuned model beside the base model.

Both models draw from the same seeds, so each column pair differs only by the fine-tune.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dreambooth.config import RunConfig
from dreambooth.models.loading import METADATA_FILE
from dreambooth.images import labelled_grid
from dreambooth.generation import generate, load_sampling_pipeline
from dreambooth.watermark import payload_for, save_marked

GRID_FILE = "samples-grid.png"


@dataclass(frozen=True)
class SampleResult:
    grid_path: str
    prompts: list[str]
    image_files: list[str]


def render_samples(model_dir: Path, config: RunConfig, output_dir: Path) -> SampleResult:
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    subject = config.subject.model_copy(update={"class_noun": metadata["class_noun"]})
    settings = config.samples
    prompts = [subject.render(template, metadata["identifier"]) for template in settings.prompts]
    models = [("fine-tuned", str(model_dir))]
    if settings.compare_with_base:
        models.insert(0, ("base", config.model.base))

    output_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[list[Image.Image]]] = {}
    files = []
    for label, reference in models:
        base = label == "base"
        payload = payload_for(reference)
        pipeline = load_sampling_pipeline(reference, settings.sampler, config.model.revision if base else None, config.model.vae if base else None)
        requests = [(p, settings.sampler.seed + i) for p in prompts for i in range(settings.images_per_prompt)]
        flat = generate(pipeline, requests, settings.sampler, config.model.resolution)
        per_prompt = settings.images_per_prompt
        images[label] = [flat[p * per_prompt : (p + 1) * per_prompt] for p in range(len(prompts))]
        for p_index, batch in enumerate(images[label]):
            for i, image in enumerate(batch):
                name = f"{label}-p{p_index:02d}-s{settings.sampler.seed + i}.png"
                save_marked(image, output_dir / name, payload)
                files.append(name)
        del pipeline

    rows = []
    for p_index, prompt in enumerate(prompts):
        cells = [
            (f"{label} seed {settings.sampler.seed + i}", images[label][p_index][i])
            for label, _ in models
            for i in range(settings.images_per_prompt)
        ]
        rows.append((prompt, cells))
    grid_path = output_dir / GRID_FILE
    save_marked(labelled_grid(rows), grid_path, payload_for(model_dir))
    return SampleResult(grid_path=str(grid_path), prompts=prompts, image_files=files)
