"""Data-path benchmark: training steps/s with aspect-ratio buckets and a masked loss, against the square path.

    python bench/data_bench.py [--base-model tiny://sd-bench] [--steps 60] [--repeats 3]

The same subject (the sample dog's four photos, plus a 3:4 portrait and a 16:9 landscape cut from
them, a mask beside each) and the same supplied class images train with the same settings
(full fine-tune, batch 1 subject + 1 class image, prior preservation) in three ways:

- square: every photo resized and centre-cropped to the one training square (data.buckets false);
- buckets: each photo at its nearest aspect-ratio bucket, a batch one bucket (data.buckets true);
- buckets + masks: that, and the loss weighted 0.2 outside each photo's mask (training.mask_weight).

Steps/s is the training loop's own steady-state figure (the first steps, which pay for
allocation, excluded); the variants alternate, `--repeats` times, and the median is printed with
each variant's cost against the square path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHOTOS = REPO / "examples" / "subjects" / "dog"
VARIANTS = {
    "square": {"data": {"buckets": False}},
    "buckets": {"data": {"buckets": True}},
    "buckets + masks": {"data": {"buckets": True}, "training": {"mask_weight": 0.2}},
}


def _subject(folder: Path) -> Path:
    """The dog's photos, a portrait and a landscape cut from the first, and a mask (an ellipse) beside each."""
    folder.mkdir(parents=True)
    for path in sorted(PHOTOS.glob("*.jpg")):
        Image.open(path).convert("RGB").save(folder / f"{path.stem}.png")
    first = Image.open(folder / "00.png")
    width, height = first.size
    first.crop((width // 8, 0, width // 8 + height * 3 // 4, height)).save(folder / "portrait.png")
    first.crop((0, height // 4, width, height // 4 + width * 9 // 16)).save(folder / "landscape.png")
    for photo in list(folder.glob("*.png")):
        mask = Image.new("L", Image.open(photo).size, 0)
        ImageDraw.Draw(mask).ellipse((mask.width // 5, mask.height // 5, mask.width * 4 // 5, mask.height * 4 // 5), fill=255)
        mask.save(folder / f"{photo.stem}.mask.png")
    return folder


def _class_images(folder: Path, count: int = 8) -> Path:
    import numpy as np

    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(generator.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def _steps_per_second(variant: dict, root: Path, subject: Path, classes: Path, args, run: int) -> float:
    from dreambooth.config import load_config
    from dreambooth.config_files import merge_settings
    from dreambooth.fine_tune import fine_tune

    overrides = merge_settings({
        "model": {"base": args.base_model},
        "subject": {"class_noun": "dog", "identifier": "fqs", "min_image_size": 64},
        "priors": {"class_images": str(classes)},
        "training": {"max_steps": args.steps, "learning_rate": 5e-6, "random_flip": False, "checkpoint_every": 10_000, "log_every": 10_000},
        "storage": {"work_dir": str(root / f"work-{run}")},
        "evaluation": {"enabled": False},
    }, variant)
    config = load_config("tiny", overrides)
    return fine_tune(subject, classes, "fqs", config, root / f"model-{run}").steps_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default="tiny://sd-bench")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="data-bench-") as scratch:
        root = Path(scratch)
        subject, classes = _subject(root / "subject"), _class_images(root / "classes")
        figures: dict[str, list[float]] = {name: [] for name in VARIANTS}
        run = 0
        for _ in range(args.repeats):
            for name, variant in VARIANTS.items():
                figures[name].append(_steps_per_second(variant, root, subject, classes, args, run))
                run += 1
    square = statistics.median(figures["square"])
    print(f"data bench: {args.base_model}, {args.steps} steps, median of {args.repeats}")
    print(f"{'variant':<18} {'steps/s':>8} {'vs square':>10}")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name:<18} {median:8.2f} {100 * (median / square - 1):+9.1f}%")


if __name__ == "__main__":
    main()
