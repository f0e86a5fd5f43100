"""Stage 4: sample images of the subject in new contexts, fine-tuned model beside the base model.

Both models draw from the same seeds, so each column pair differs only by the fine-tune.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dreambooth.config import RunConfig, SamplerSettings
from dreambooth.finetune import METADATA_FILE
from dreambooth.images import labelled_grid
from dreambooth.models import inference_dtype, load_pipeline, native_resolution, use_sampler

GRID_FILE = "samples-grid.png"


@dataclass(frozen=True)
class SampleResult:
    grid_path: str
    prompts: list[str]
    image_files: list[str]


def generate_images(pipeline, prompt: str, count: int, sampler: SamplerSettings, resolution: int) -> list[Image.Image]:
    return pipeline(
        [prompt] * count,
        negative_prompt=[sampler.negative_prompt] * count if sampler.negative_prompt else None,
        num_inference_steps=sampler.num_inference_steps,
        guidance_scale=sampler.guidance_scale,
        height=resolution,
        width=resolution,
        generator=[torch.Generator("cpu").manual_seed(sampler.seed + i) for i in range(count)],
    ).images


def render_samples(model_dir: Path, config: RunConfig, output_dir: Path) -> SampleResult:
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    identifier, class_noun = metadata["identifier"], metadata["class_noun"]
    settings = config.samples
    prompts = [p.format(identifier=identifier, class_noun=class_noun) for p in settings.prompts]
    models = [("fine-tuned", str(model_dir))]
    if settings.compare_with_base:
        models.insert(0, ("base", config.model.base))

    output_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[list[Image.Image]]] = {}
    files = []
    for label, reference in models:
        pipeline = load_pipeline(
            reference,
            config.model.revision if label == "base" else None,
            torch_dtype=inference_dtype(settings.sampler.precision),
        )
        use_sampler(pipeline, settings.sampler.scheduler)
        resolution = config.model.resolution or native_resolution(pipeline)
        images[label] = [generate_images(pipeline, p, settings.images_per_prompt, settings.sampler, resolution) for p in prompts]
        for p_index, batch in enumerate(images[label]):
            for i, image in enumerate(batch):
                name = f"{label}-p{p_index:02d}-s{settings.sampler.seed + i}.png"
                image.save(output_dir / name)
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
    labelled_grid(rows).save(grid_path)
    return SampleResult(grid_path=str(grid_path), prompts=prompts, image_files=files)
