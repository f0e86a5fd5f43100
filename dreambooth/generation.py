"""The one text-to-image sampling loop: (prompt, seed) requests in batches.

Each image gets its own seeded generator, so image i is the same whatever the batch size:
a retried task, a re-run or a different batch size reproduces it.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from PIL import Image

from dreambooth.config import SamplerSettings
from dreambooth.errors import InputError
from dreambooth.models.loading import inference_dtype, load_pipeline, native_resolution, use_sampler
from dreambooth.process import configure_process


def call_parameters(pipeline) -> set[str]:
    """What the pipeline's __call__ takes (the zero-shot baseline's: the pipeline inside its photos' wrapper)."""
    return set(inspect.signature(getattr(pipeline, "__wrapped__", pipeline).__call__).parameters)


def load_sampling_pipeline(reference: str, sampler: SamplerSettings, revision: str | None = None, vae: str | None = None):
    pipeline = load_pipeline(reference, revision, torch_dtype=inference_dtype(sampler.precision), vae=vae)
    use_sampler(pipeline, sampler.scheduler)
    if sampler.negative_prompt and "negative_prompt" not in call_parameters(pipeline):
        raise InputError(f"sampler.negative_prompt: a {type(pipeline).__name__} takes no negative prompt; leave it empty")
    return pipeline


def guidance_arguments(pipeline, sampler: SamplerSettings, count: int) -> dict:
    """Classifier-free guidance as the pipeline takes it: guidance_scale (and a negative prompt when one is
    set), or for Qwen-Image true_cfg_scale with a negative prompt (its own default, " ", when none is set)."""
    if "true_cfg_scale" in call_parameters(pipeline):
        return {"true_cfg_scale": sampler.guidance_scale, "negative_prompt": [sampler.negative_prompt or " "] * count}
    negative = {"negative_prompt": [sampler.negative_prompt] * count} if sampler.negative_prompt else {}
    return {"guidance_scale": sampler.guidance_scale, **negative}


def generate_batches(
    pipeline, requests: list[tuple[str, int]], sampler: SamplerSettings, resolution: int | None = None
) -> Iterator[tuple[list[tuple[str, int]], list[Image.Image]]]:
    """Yield (requests, images) batch by batch, so callers can save progress as they go."""
    size = resolution or native_resolution(pipeline)
    for start in range(0, len(requests), sampler.batch_size):
        batch = requests[start : start + sampler.batch_size]
        prompts = [prompt for prompt, _ in batch]
        images = pipeline(
            prompt=prompts,  # by name: a reference-image pipeline (Flux.2) takes its images first
            **guidance_arguments(pipeline, sampler, len(batch)),
            num_inference_steps=sampler.num_inference_steps,
            height=size,
            width=size,
            generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in batch],
        ).images
        yield batch, images


OnImages = Callable[[int], None]  # n more images drawn


def generate(pipeline, requests: list[tuple[str, int]], sampler: SamplerSettings, resolution: int | None = None,
             on_images: Optional[OnImages] = None) -> list[Image.Image]:
    drawn = []
    for _, images in generate_batches(pipeline, requests, sampler, resolution):
        drawn.extend(images)
        if on_images:
            on_images(len(images))
    return drawn


def planned_generators(configured: Optional[int], work: int) -> int:
    """Processes to sample with: the configured count, else one per visible GPU; never more than the work."""
    return max(1, min(configured or max(torch.cuda.device_count(), 1), work))


def generate_files(
    reference: str,
    revision: Optional[str],
    requests: list[tuple[str, int]],
    names: list[str],
    folder: Path,
    sampler: SamplerSettings,
    resolution: Optional[int] = None,
    processes: int = 1,
    vae: Optional[str] = None,
    on_images: Optional[OnImages] = None,
) -> None:
    """Draw requests[i] into folder/names[i] (PNG, written then renamed, so a file is whole or absent).

    With several processes (one per GPU through CUDA_VISIBLE_DEVICES), process k draws every k-th
    request; images depend only on their seeds, so the split changes nothing but the wall time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if processes > 1:
        _generate_files_in_processes(reference, revision, requests, names, folder, sampler, resolution, processes, vae)
        if on_images:
            on_images(len(requests))
        return
    pipeline = load_sampling_pipeline(reference, sampler, revision, vae)
    name_of = dict(zip(requests, names))
    for batch, images in generate_batches(pipeline, requests, sampler, resolution):
        for request, image in zip(batch, images):
            partial = folder / (name_of[request] + ".partial")
            image.save(partial, format="PNG")
            partial.rename(folder / name_of[request])
        if on_images:
            on_images(len(batch))


def _generate_files_in_processes(reference, revision, requests, names, folder, sampler, resolution, processes, vae) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        workers = []
        for shard in range(processes):
            job = Path(scratch) / f"shard-{shard}.json"
            job.write_text(json.dumps({
                "reference": reference, "revision": revision, "requests": requests[shard::processes],
                "names": names[shard::processes], "folder": str(folder), "sampler": sampler.model_dump(),
                "resolution": resolution, "vae": vae,
            }))
            env = dict(os.environ)
            if torch.cuda.is_available():
                env["CUDA_VISIBLE_DEVICES"] = str(shard)
            workers.append(subprocess.Popen([sys.executable, "-m", "dreambooth.generation", str(job)], env=env))
        codes = [worker.wait() for worker in workers]
    if any(codes):
        raise RuntimeError(f"image generation failed in {sum(1 for code in codes if code)} of {processes} processes")


if __name__ == "__main__":  # one shard of generate_files
    configure_process()
    shard = json.loads(Path(sys.argv[1]).read_text())
    generate_files(
        shard["reference"], shard["revision"], [tuple(r) for r in shard["requests"]], shard["names"],
        Path(shard["folder"]), SamplerSettings(**shard["sampler"]), shard["resolution"], vae=shard["vae"],
    )
