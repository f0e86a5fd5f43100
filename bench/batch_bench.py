"""Batch benchmark: four subjects of one class as one batch against four single-subject runs.

    python bench/batch_bench.py [--base-model tiny://sd-bench] [--class-images 50] [--steps 200]

Both sides run the whole pipeline (`dreambooth run` through kfp.local: plan, class priors,
ingest, fine-tune, samples) with the same settings; evaluation and super-resolution are off so
the figures are about what batching changes. Each single run starts from nothing (its own work
folder and MLflow store), as four separate runs of a one-subject tool would; the batch generates
the class's priors once for all four. Prints total wall time, the share spent generating class
priors (from the class-priors runs' own timings in MLflow) and the cost per subject.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "examples" / "subjects" / "dog"
SUBSETS = [["00.jpg", "01.jpg", "02.jpg"], ["00.jpg", "01.jpg", "03.jpg"], ["00.jpg", "02.jpg", "03.jpg"], ["01.jpg", "02.jpg", "03.jpg"]]


def _config(root: Path, args) -> Path:
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "extends": "tiny",
        "model": {"base": args.base_model},
        "priors": {"num_class_images": args.class_images, "sampler": {"num_inference_steps": 20, "batch_size": 10}},
        "training": {"max_steps": args.steps, "learning_rate": 5.0e-6, "checkpoint_every": args.steps, "log_every": 10},
        "samples": {"images_per_prompt": 1, "sampler": {"num_inference_steps": 20}},
        "superres": {"enabled": False},
        "evaluation": {"enabled": False},
    }))
    return path


def _subjects(root: Path) -> list[Path]:
    folders = []
    for index, names in enumerate(SUBSETS):
        folder = root / "photos" / f"dog-{index}"
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes((PHOTOS / name).read_bytes())
        folders.append(folder)
    return folders


def _pipeline(cwd: Path, *args: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "run", *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"pipeline run failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


def _stage_seconds(cwd: Path) -> tuple[float, float]:
    """(seconds the class-priors stages took, seconds the fine-tunes trained), summed over the store in cwd."""
    from dreambooth.stages import CLASS_PRIORS
    from dreambooth.tracking import STAGE_SUBJECT, stage_runs

    store = f"sqlite:///{cwd / 'mlflow.db'}"
    priors, subjects = stage_runs(store, "dreambooth", CLASS_PRIORS.name), stage_runs(store, "dreambooth", STAGE_SUBJECT)
    return (sum(run.data.metrics.get("priors_seconds", 0.0) for run in priors),
            sum(run.data.metrics.get("train_seconds", 0.0) for run in subjects))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default="tiny://sd-bench", help="default: the 17.6M-parameter SD-layout UNet at 64 px")
    parser.add_argument("--class-images", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dreambooth-batch-bench-"))
    config, folders = _config(root, args), _subjects(root)
    common = ["--config", str(config), "--output-dir", "out"]

    singles, single_priors, single_training = 0.0, 0.0, 0.0
    for folder in folders:
        cwd = root / f"single-{folder.name}"
        cwd.mkdir()
        singles += _pipeline(cwd, *common, "--subject-dir", str(folder), "--class-noun", "dog")
        priors, training = _stage_seconds(cwd)
        single_priors, single_training = single_priors + priors, single_training + training

    cwd = root / "batch"
    cwd.mkdir()
    subjects_file = cwd / "subjects.yaml"
    subjects_file.write_text(yaml.safe_dump({"subjects": [{"id": f.name, "photos": str(f), "class_noun": "dog"} for f in folders]}))
    batch = _pipeline(cwd, *common, "--subjects", str(subjects_file))
    batch_priors, batch_training = _stage_seconds(cwd)

    n = len(folders)
    print(f"four dog subjects, {args.class_images} class images and {args.steps} steps each, {args.base_model}, "
          "whole pipeline through kfp.local (evaluation and super-resolution off)")
    print(f"{'':26}{'wall s':>9}{'priors s':>10}{'priors share':>14}{'training s':>12}{'per subject s':>15}")
    for name, wall, priors, training in (("four single runs", singles, single_priors, single_training),
                                         ("one batch of four", batch, batch_priors, batch_training)):
        print(f"{name:26}{wall:9.1f}{priors:10.1f}{priors / wall:13.0%}{training:12.1f}{wall / n:15.1f}")
    print(f"{'batch / single runs':26}{batch / singles:9.2f}x   (target: at most 0.75x)")


if __name__ == "__main__":
    main()
