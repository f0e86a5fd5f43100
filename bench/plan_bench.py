"""Planning benchmark: how long planning a large subjects file takes, and how many MLflow calls it makes
per subject.

    python bench/plan_bench.py [--subjects 1000] [--services] [--max-subjects-per-run K]
                               [--tracking-uri URI] [--photos-uri gs://bucket/prefix]

Writes N subjects of 3 small distinct photos each (local, or uploaded under --photos-uri), then plans
them twice against the same tracking store: the first night, when every subject is new, and the next,
after every subject was marked trained (all found up to date). Prints wall time, peak memory of the
process and MlflowClient calls per subject for each. Without sharding the plan is the plan task
(`dreambooth.tasks.batch.plan_task`, the pipeline's first step: a subject run opened for each). With
--max-subjects-per-run K it is a sharded batch's launch (`dreambooth.tasks.launch.launch_shards`: the
whole file planned once, nothing opened per subject) followed by every shard's own plan task, as the
shards' runs do side by side on a cluster; it also prints the Argo nodes one shard of K subjects
holds (gke-sd15 compiled for the cluster) against the limit. The tracking store defaults to a fresh
SQLite file; --services starts the cluster's setup here instead: PostgreSQL, an `mlflow server` on
it, and the GCS emulator holding the photos (tests/services.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
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
    """count subjects' photo folders (3 JPEGs of distinct bytes each); their URIs (uploaded 16 at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    from dreambooth.storage import upload_folder

    folders = []
    for index in range(count):
        folder = root / "photos" / f"subject-{index:05d}"
        folder.mkdir(parents=True)
        for photo in range(3):
            image = Image.new("RGB", (64, 64), ((index * 3 + photo) % 256, index // 256 % 256, photo * 80))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            (folder / f"{photo:02d}.jpg").write_bytes(buffer.getvalue())
        folders.append(folder)
    if not photos_uri:
        return [str(folder) for folder in folders]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda folder: upload_folder(folder, f"{photos_uri.rstrip('/')}/{folder.name}"), folders))


def _night(label: str, run, calls: Counter, subjects: int) -> None:
    calls.clear()
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = sum(calls.values())
    busiest = ", ".join(f"{name} {count}" for name, count in calls.most_common(4))
    print(f"{label:<26} {seconds:7.1f} s  {1000 * seconds / subjects:6.1f} ms/subject  peak {peak:6.0f} MiB  "
          f"{total / subjects:5.2f} MLflow calls/subject ({busiest})", file=sys.__stdout__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--tracking-uri", help="default: a fresh SQLite file")
    parser.add_argument("--photos-uri", default="", help="gs://bucket/prefix to upload the photos to (default: local folders)")
    parser.add_argument("--services", action="store_true", help="start PostgreSQL, an mlflow server on it and the GCS emulator")
    parser.add_argument("--max-subjects-per-run", type=int, default=0, help="plan as a sharded batch of shards this large")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as services:
        root = Path(scratch)
        if args.services:
            args.tracking_uri, args.photos_uri = _start_services(root, services)
        tracking = args.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        started = time.perf_counter()
        photos = _photos(root, args.subjects, args.photos_uri)
        subjects = root / "subjects.yaml"
        subjects.write_text(yaml.safe_dump({"subjects": [{"id": Path(uri).name, "photos": uri, "class_noun": "dog"} for uri in photos]}))
        print(f"{args.subjects} subjects, {3 * args.subjects} photos written in {time.perf_counter() - started:.1f} s; tracking {tracking}")
        plan = _sharded if args.max_subjects_per_run else _unsharded
        plan(root, tracking, subjects, args.subjects, args.max_subjects_per_run)


def _start_services(root: Path, services: contextlib.ExitStack) -> tuple[str, str]:
    """PostgreSQL, an mlflow server on it (artifacts proxied to a folder) and the GCS emulator: (tracking URI, photos URI)."""
    from tests.services import GcsEmulatorProcess, MlflowServer, start_postgres

    database, stop_postgres = start_postgres()
    services.callback(stop_postgres)
    server = MlflowServer(root, str(root / "artifacts"), backend_store_uri=database, workers=4).start()  # manifests/: MLflow's default
    services.callback(server.stop)
    emulator = GcsEmulatorProcess("catalogue").start()
    services.callback(emulator.stop)
    os.environ.update({"STORAGE_EMULATOR_HOST": emulator.host, "GOOGLE_CLOUD_PROJECT": "bench"})
    return server.uri, "gs://catalogue/photos"


def _config(root: Path, shard_size: int = 0) -> str:
    from dreambooth.config import load_config

    batch = {"max_subjects_per_run": shard_size} if shard_size else {}
    return load_config("tiny", {"storage": {"work_dir": str(root / "work")}, "batch": batch}).to_json()


def _mark_trained(tracking: str, batch_run_ids: list[str]) -> None:
    """As the summary closes a subject whose stages succeeded."""
    from dreambooth.tracking import TAG_SUBJECT_STATUS, TRAINED, client, subject_runs

    from concurrent.futures import ThreadPoolExecutor

    mlflow = client(tracking)

    def close(run) -> None:
        mlflow.set_tag(run.info.run_id, TAG_SUBJECT_STATUS, TRAINED)
        mlflow.set_terminated(run.info.run_id)

    with ThreadPoolExecutor(max_workers=8) as pool:  # not measured: setting up the next night
        list(pool.map(close, [run for batch in batch_run_ids for run in subject_runs(tracking, batch)]))


def _unsharded(root: Path, tracking: str, subjects: Path, count: int, _: int) -> None:
    from dreambooth.tasks.batch import plan_task
    from dreambooth.tracking.store import counted_client_calls

    config = _config(root)

    def plan(night: str):
        return lambda: plan_task(config, tracking, str(subjects), "", False, night, night, str(root / f"{night}.json"))

    with counted_client_calls() as calls:
        _night("first night (all new)", plan("night-1"), calls, count)
    _mark_trained(tracking, [yaml.safe_load((root / "night-1.json").read_text())["batch_run_id"]])
    with counted_client_calls() as calls:
        _night("next night (up to date)", plan("night-2"), calls, count)


def _sharded(root: Path, tracking: str, subjects: Path, count: int, shard_size: int) -> None:
    from dreambooth.commands.submit import compile_dag
    from dreambooth.config import load_config
    from dreambooth.catalogue.subjects import entries_to_json
    from dreambooth.tasks.batch import plan_task
    from dreambooth.tasks.launch import launch_shards
    from dreambooth.tracking.store import counted_client_calls
    from dreambooth.dag.workflow_size import NODE_LIMIT, workflow_nodes

    config = _config(root, shard_size)
    launched: list = []

    def launch(night: str):
        def run() -> None:
            launched.clear()
            launch_shards(config, tracking, str(subjects), False, night, night, lambda shard, entries: launched.append((shard, entries)) or "")
        return run

    def shard_plans(night: str):  # each shard's run opens its subject runs: on a cluster, side by side
        def run() -> None:
            for shard, entries in launched:
                name = f"{night}-shard-{shard.index}"
                plan_task(config, tracking, "", entries_to_json(entries), False, name, name, str(root / f"{name}.json"), None, shard.to_json())
        return run

    with contextlib.redirect_stdout(io.StringIO()):  # a line per subject
        with counted_client_calls() as calls:
            _night("first night: launch", launch("night-1"), calls, count)
        print(f"{len(launched)} shards of at most {shard_size}", file=sys.__stdout__)
        with counted_client_calls() as calls:
            _night("first night: shard plans", shard_plans("night-1"), calls, count)
        _mark_trained(tracking, [yaml.safe_load((root / f"night-1-shard-{shard.index}.json").read_text())["batch_run_id"]
                                 for shard, _ in launched])
        with counted_client_calls() as calls:
            _night("next night: launch", launch("night-2"), calls, count)
    print(f"next night: {len(launched)} shards launched")
    cluster = load_config("gke-sd15", {"batch": {"max_subjects_per_run": shard_size}})
    spec = next(yaml.safe_load_all(compile_dag(cluster, root / "shard.yaml", on_cluster=True).read_text()))
    print(f"one shard of {shard_size} subjects (gke-sd15): up to {workflow_nodes(spec, shard_size)} Argo nodes (limit {NODE_LIMIT})")


if __name__ == "__main__":
    main()
