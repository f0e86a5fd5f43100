"""The one text-to-image sampling loop: (prompt, seed) requests in batches.

Each image gets its own seeded generator, so image i is the same whatever the batch size:
a retried task, a re-run or a different batch size reproduces it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from PIL import Image

from dreambooth.config import SamplerSettings
from dreambooth.models import inference_dtype, load_pipeline, native_resolution, use_sampler


def load_sampling_pipeline(reference: str, sampler: SamplerSettings, revision: str | None = None):
    pipeline = load_pipeline(reference, revision, torch_dtype=inference_dtype(sampler.precision))
    use_sampler(pipeline, sampler.scheduler)
    return pipeline


def generate_batches(
    pipeline, requests: list[tuple[str, int]], sampler: SamplerSettings, resolution: int | None = None
) -> Iterator[tuple[list[tuple[str, int]], list[Image.Image]]]:
    """Yield (requests, images) batch by batch, so callers can save progress as they go."""
    size = resolution or native_resolution(pipeline)
    for start in range(0, len(requests), sampler.batch_size):
        batch = requests[start : start + sampler.batch_size]
        prompts = [prompt for prompt, _ in batch]
        images = pipeline(
            prompts,
            negative_prompt=[sampler.negative_prompt] * len(batch) if sampler.negative_prompt else None,
            num_inference_steps=sampler.num_inference_steps,
            guidance_scale=sampler.guidance_scale,
            height=size,
            width=size,
            generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in batch],
        ).images
        yield batch, images


def generate(pipeline, requests: list[tuple[str, int]], sampler: SamplerSettings, resolution: int | None = None) -> list[Image.Image]:
    return [image for _, images in generate_batches(pipeline, requests, sampler, resolution) for image in images]
