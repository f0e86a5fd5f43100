"""Run the whole DAG on this machine through kfp.local, then report what the batch did.

Every task runs as its own process, exactly as its component would in a container. Results land
under `{output}/kfp/{job}/`; with a gs:// output they are published to the bucket afterwards.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from dreambooth.cluster import run_parameters
from dreambooth.config import RunConfig
from dreambooth.models import LORA_WEIGHTS
from dreambooth.storage import is_gcs, upload_folder
from dreambooth.summary import UP_TO_DATE, SubjectRow, collect_rows, headline
from dreambooth.tracking import FAILED, SPOOL_FOLDER, TAG_ERROR, experiment_id, find_batch_run, resolve_tracking_uri
from dreambooth.tracking.spool import sync_spooled

PIPELINE_PREFIX = "dreambooth-"
BATCH_FAILURES_TASK = "batch-failures"
PUBLISHED_FOLDERS = {"model": "model", "sample grid": "samples", "upscaler": "upscaler", "evaluation": "evaluation"}


def failed_task_chain(message: str) -> Optional[str]:
    """From kfp.local's failure report, the failed task and the groups around it
    ("batch-failures inside exit-handler-1"); None when the error is not a task failure."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = re.search(r"Inner task failed: (.+)\.$", plain.strip())
    return found.group(1).replace("'", "") if found else None


def _latest_job_dir(pipeline_root: Path, before: set[Path]) -> Path:
    created = [p for p in pipeline_root.glob(f"{PIPELINE_PREFIX}*") if p.is_dir() and p not in before]
    if not created:
        raise RuntimeError(f"{pipeline_root}: the local run wrote no job folder")
    return max(created, key=lambda p: p.stat().st_mtime)


def run_locally(
    build_pipeline: Callable, config: RunConfig, output: str, subjects: int,
    subjects_uri: str = "", subjects_json: str = "", force: bool = False,
) -> int:
    """Run the DAG through kfp.local for `subjects` subjects; print each one's outcome; 1 when any failed."""
    # Tasks that run side by side share this machine's cores; unbounded, each task's torch would
    # take them all and the oversubscribed threads run several times slower than one at a time.
    side_by_side = max(1, min(config.batch.parallelism, subjects))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // side_by_side)))
    if not is_gcs(output):
        return _run(build_pipeline, config, Path(output), subjects_uri, subjects_json, force)
    # kfp.local writes task outputs to a local pipeline root; results are published to GCS after.
    with tempfile.TemporaryDirectory(prefix="dreambooth-run-") as staging:
        return _run(build_pipeline, config, Path(staging), subjects_uri, subjects_json, force, publish_to=output.rstrip("/"))


def _run(
    build_pipeline: Callable, config: RunConfig, output_dir: Path, subjects_uri: str, subjects_json: str, force: bool,
    publish_to: Optional[str] = None,
) -> int:
    from kfp import local

    from dreambooth.tasks.batch import read_plan

    tracking_uri = resolve_tracking_uri(config.tracking.uri)
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": tracking_uri})})
    # Create the store and experiment once, here, before parallel tasks race to set up a fresh database.
    experiment_id(tracking_uri, config.tracking.experiment)
    for outcome in sync_spooled(Path(config.storage.work_dir) / SPOOL_FOLDER, tracking_uri):
        print(f"tracking: sent {outcome.sent} step metrics an earlier run kept on disk (run {outcome.run_id})" if not outcome.error
              else f"tracking: could not yet send step metrics of run {outcome.run_id}: {outcome.error}")
    pipeline_root = output_dir.resolve() / "kfp"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.glob(f"{PIPELINE_PREFIX}*"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    print_function = builtins.print
    failed_task = None
    try:
        build_pipeline(config)(**run_parameters(config, subjects_uri, subjects_json, force))  # local: no cluster settings
    except RuntimeError as error:
        failed_task = failed_task_chain(str(error))
        if failed_task is None:
            raise
    finally:
        # kfp.local indents task output by swapping builtins.print, and parallel tasks can leave it swapped.
        builtins.print = print_function

    job_dir = _latest_job_dir(pipeline_root, before)
    batch = find_batch_run(tracking_uri, config.tracking.experiment, job_name=job_dir.name)
    print()
    print(f"job:          {job_dir.name}")
    # batch-failures fails the run on purpose when a subject failed: the subjects' lines say why.
    broken = failed_task if failed_task and failed_task.split(" inside ")[0] != BATCH_FAILURES_TASK else None
    if broken:
        print(f"error: task {broken} failed (its log is above); outputs under {job_dir}", file=sys.stderr)
    if batch is None:
        print(f"error: the batch did not start; task logs are above, outputs under {job_dir}", file=sys.stderr)
        return 1
    print(f"mlflow run:   {batch.info.run_id} ({tracking_uri}, experiment {config.tracking.experiment!r})")
    if TAG_ERROR in batch.data.tags:
        for line in batch.data.tags[TAG_ERROR].splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    rows = collect_rows(tracking_uri, read_plan(tracking_uri, batch.info.run_id))
    print(f"batch:        {headline(rows)}")
    for row in rows:
        print()
        _print_subject(row, publish_to and f"{publish_to}/{job_dir.name}/{row.subject}")
    if tracking_uri.startswith("http"):
        print(f"\nmlflow ui:    {tracking_uri.rstrip('/')}/#/experiments/{batch.info.experiment_id}/runs/{batch.info.run_id}")
    failed = [row for row in rows if row.status == FAILED]
    if broken:
        return 1
    if failed:
        named = "; ".join(f"{row.subject} at {row.reason}" for row in failed)
        print(f"error: {len(failed)} of {len(rows)} subjects failed: {named}", file=sys.stderr)
        return 1
    return 0


def _local_outputs(row: SubjectRow) -> dict[str, Path]:
    """The subject's result files and folders on this machine, by label."""
    if not row.model or is_gcs(row.model):
        return {}
    model = Path(row.model)
    found = {"model": model}
    if row.status != UP_TO_DATE:  # kfp.local puts every task of a subject under one iteration folder
        iteration = model.parent.parent
        found.update({
            "sample grid": iteration / "samples" / "sample_images" / "samples-grid.png",
            "upscaler": iteration / "superres" / "upscaler",
            "evaluation": iteration / "evaluate" / "evaluation" / "report.md",
        })
    def present(path: Path) -> bool:  # a file, a pipeline folder or a LoRA adapter folder
        return path.is_file() or (path / "model_index.json").is_file() or (path / LORA_WEIGHTS).is_file()

    return {label: path for label, path in found.items() if present(path)}


def _print_subject(row: SubjectRow, publish_to: Optional[str]) -> None:
    """The subject's outcome and where its results are (published to gs:// first when asked)."""
    if row.status == FAILED:
        print(f"{row.subject} ({row.class_noun}): failed at {row.reason}")
        print(f"  mlflow run:   {row.mlflow_run}")
        return
    seconds = f" in {row.training_seconds:.0f} s" if row.training_seconds is not None and row.status != UP_TO_DATE else ""
    print(f"{row.subject} ({row.class_noun}): {row.status}{seconds}")
    for label, path in _local_outputs(row).items():
        shown = str(path)
        if publish_to and row.status != UP_TO_DATE:
            folder = path if path.is_dir() else path.parent
            shown = upload_folder(folder, f"{publish_to}/{PUBLISHED_FOLDERS[label]}") + ("" if path.is_dir() else f"/{path.name}")
        print(f"  {label + ':':<14}{shown}")
    if row.model and is_gcs(row.model):
        print(f"  {'model:':<14}{row.model}")
    if row.subject_loss_change is not None and row.status != UP_TO_DATE:
        drift = "" if row.class_loss_change is None else f", class images {100 * row.class_loss_change:+.1f}%"
        print(f"  learned:      denoising loss vs the base model: subject photos {100 * row.subject_loss_change:+.1f}%{drift}")
    if row.gate:
        gate = f"passed, registered as {row.registered}" if row.gate == "passed" else f"rejected ({row.reason.removeprefix('gate: ')})"
        print(f"  quality gate: {gate}")
    print(f"  mlflow run:   {row.mlflow_run}")
