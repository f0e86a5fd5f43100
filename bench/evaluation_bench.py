"""Evaluation benchmark: images/s for generation and for scoring (DINO, CLIP, LPIPS), batched vs one by one.

    python bench/evaluation_bench.py [--model tiny://sd-bench] [--dino tiny://dino] [--clip tiny://clip]
                                     [--lpips tiny://lpips] [--images 32] [--batch 8]

Real encoders: --dino facebook/dino-vits16 --clip openai/clip-vit-base-patch32 --lpips DIR.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rate(count: int, work) -> float:
    started = time.perf_counter()
    work()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny://sd-bench")
    parser.add_argument("--dino", default="tiny://dino")
    parser.add_argument("--clip", default="tiny://clip")
    parser.add_argument("--lpips", default="tiny://lpips")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    from dreambooth.config import SamplerSettings
    from dreambooth.evaluation.encoders import ClipEncoder, DinoEncoder, LpipsDistance
    from dreambooth.evaluation.metrics import distinct_pairs
    from dreambooth.generation import generate, load_sampling_pipeline

    print(f"model {args.model}; encoders {args.dino}, {args.clip}, {args.lpips}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.images} images")
    requests = [("a fqs dog on the beach", seed) for seed in range(args.images)]
    rows = []
    # One pipeline for both measurements: only the batch size differs.
    pipeline = load_sampling_pipeline(args.model, SamplerSettings(num_inference_steps=args.steps))
    images: list = []
    for batch in (1, args.batch):
        sampler = SamplerSettings(num_inference_steps=args.steps, batch_size=batch)
        generate(pipeline, requests[:batch], sampler)  # warm-up
        rate = _rate(len(requests), lambda: images.extend(generate(pipeline, requests, sampler)))
        rows.append((f"generation, batch {batch} ({args.steps} steps)", rate))
    images = images[: args.images]

    for batch in (1, args.batch):
        dino, clip = DinoEncoder(args.dino, batch), ClipEncoder(args.clip, batch)
        dino.embed(images[:batch]), clip.embed(images[:batch])  # warm-up
        rows.append((f"DINO embedding, batch {batch}", _rate(len(images), lambda: dino.embed(images))))
        rows.append((f"CLIP embedding, batch {batch}", _rate(len(images), lambda: clip.embed(images))))
        lpips = LpipsDistance(args.lpips, batch)
        pairs = [(images[a], images[b]) for a, b in distinct_pairs(len(images))][: args.images * 2]
        rows.append((f"LPIPS pairs, batch {batch}", _rate(len(pairs), lambda: lpips.pairwise(pairs))))

    print(f"\n{'':40}{'per second':>12}")
    for name, rate in rows:
        print(f"{name:40}{rate:12.1f}")


if __name__ == "__main__":
    main()
