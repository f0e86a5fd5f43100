"""Planning benchmark: how long the plan task takes for a large subjects file, and how many MLflow calls
it makes per subject.

    python bench/plan_bench.py [--subjects 1000] [--tracking-uri URI] [--photos-uri gs://bucket/prefix]

Writes N subjects of 3 small distinct photos each (local, or uploaded under --photos-uri), then runs the
plan task (`dreambooth.tasks.batch.plan_task`, as the pipeline's first step runs it) twice against the
same tracking store: the first night, when every subject is new (a subject run opened for each), and
the next, after every subject was marked trained (all found up to date). Prints wall time, peak
memory of the process and MlflowClient calls per subject for each. The tracking store defaults to a
fresh SQLite file; give an `mlflow server` on PostgreSQL with --tracking-uri for the cluster's setup.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _photos(root: Path, count: int, photos_uri: str) -> list[str]:
    """count subjects' photo folders (3 JPEGs of distinct bytes each); their URIs."""
    from dreambooth.storage import upload_folder

    uris = []
    for index in range(count):
        folder = root / "photos" / f"subject-{index:05d}"
        folder.mkdir(parents=True)
        for photo in range(3):
            image = Image.new("RGB", (64, 64), ((index * 3 + photo) % 256, index // 256 % 256, photo * 80))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            (folder / f"{photo:02d}.jpg").write_bytes(buffer.getvalue())
        uris.append(upload_folder(folder, f"{photos_uri.rstrip('/')}/{folder.name}") if photos_uri else str(folder))
    return uris


def _night(label: str, run, calls: Counter, subjects: int) -> None:
    calls.clear()
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = sum(calls.values())
    busiest = ", ".join(f"{name} {count}" for name, count in calls.most_common(4))
    print(f"{label:<22} {seconds:7.1f} s  {1000 * seconds / subjects:6.1f} ms/subject  peak {peak:6.0f} MiB  "
          f"{total / subjects:5.2f} MLflow calls/subject ({busiest})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--tracking-uri", help="default: a fresh SQLite file")
    parser.add_argument("--photos-uri", default="", help="gs://bucket/prefix to upload the photos to (default: local folders)")
    args = parser.parse_args()

    from dreambooth.config import load_config
    from dreambooth.tasks.batch import plan_task
    from dreambooth.tracking import TAG_SUBJECT_STATUS, TRAINED, client, subject_runs
    from dreambooth.tracking.store import counted_client_calls

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tracking = args.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        started = time.perf_counter()
        photos = _photos(root, args.subjects, args.photos_uri)
        subjects = root / "subjects.yaml"
        subjects.write_text(yaml.safe_dump({"subjects": [{"id": Path(uri).name, "photos": uri, "class_noun": "dog"} for uri in photos]}))
        print(f"{args.subjects} subjects, {3 * args.subjects} photos written in {time.perf_counter() - started:.1f} s; tracking {tracking}")
        config = load_config("tiny", {"storage": {"work_dir": str(root / "work")}}).to_json()

        def plan(night: str):
            return lambda: plan_task(config, tracking, str(subjects), "", False, night, night, str(root / f"{night}.json"))

        with counted_client_calls() as calls:
            _night("first night (all new)", plan("night-1"), calls, args.subjects)
        mlflow = client(tracking)
        batch = yaml.safe_load((root / "night-1.json").read_text())["batch_run_id"]
        for run in subject_runs(tracking, batch):  # as the summary closes a subject whose stages succeeded
            mlflow.set_tag(run.info.run_id, TAG_SUBJECT_STATUS, TRAINED)
            mlflow.set_terminated(run.info.run_id)
        with counted_client_calls() as calls:
            _night("next night (up to date)", plan("night-2"), calls, args.subjects)


if __name__ == "__main__":
    main()
