"""Run the whole DAG on this machine through kfp.local, then report what the batch did.

Every task runs as its own process, exactly as its component would in a container. Results land
under `{output}/kfp/{job}/`, each task's log under `{job}/logs/`; with a gs:// output they are
published to the bucket afterwards. While it runs, `run_console` shows one line per stage.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from dreambooth.dag.kfp_runs import run_parameters
from dreambooth.config import RunConfig
from dreambooth.commands.kfp_local import local_pipelines
from dreambooth.models.loading import METADATA_FILE, RESULT_ON_BASE_FILES
from dreambooth.progress import INTERVAL_ENV
from dreambooth.commands.run_console import RunConsole, planned_rows
from dreambooth.stages import BATCH_FAILURES, EVALUATE, SAMPLES, SUPER_RESOLUTION
from dreambooth.storage import is_gcs, upload_folder
from dreambooth.catalogue.subjects import SubjectEntry
from dreambooth.reports.summary import UP_TO_DATE, SubjectRow, collect_rows, headline, steps_cell
from dreambooth.tracking import FAILED, SPOOL_FOLDER, TAG_ERROR, TAG_OUTPUTS, client, experiment_id, find_batch_run, resolve_tracking_uri
from dreambooth.tracking.spool import sync_spooled


PUBLISHED_FOLDERS = {"model": "model", "sample grid": "samples", "upscaler": "upscaler", "evaluation": "evaluation"}


def run_locally(
    config: RunConfig, output: str, entries: list[SubjectEntry],
    subjects_uri: str = "", subjects_json: str = "", force: bool = False, verbose: bool = False,
) -> int:
    """Run the DAG through kfp.local for these subjects; print each one's outcome; 1 when any failed.
    With batch.max_subjects_per_run, a subjects file runs as shards (one kfp.local job each), one after another."""
    if config.batch.max_subjects_per_run and subjects_uri:
        return _run_shards(config, output, subjects_uri, force, verbose)
    return _run_subjects(config, output, entries, subjects_uri, subjects_json, force, verbose)


def _run_subjects(
    config: RunConfig, output: str, entries: list[SubjectEntry],
    subjects_uri: str = "", subjects_json: str = "", force: bool = False, verbose: bool = False, shard_json: str = "",
) -> int:
    # Tasks that run side by side share this machine's cores; unbounded, each task's torch would
    # take them all and the oversubscribed threads run several times slower than one at a time.
    side_by_side = max(1, min(config.batch.parallelism, len(entries)))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // side_by_side)))
    # A live view redraws every second; a log gets the tasks' default (a line per 10 s).
    if not verbose and sys.stdout.isatty():
        os.environ.setdefault(INTERVAL_ENV, "1")
    rows = planned_rows([entry.id for entry in entries], [entry.class_noun for entry in entries] if config.priors.enabled else [],
                        config.superres.enabled)
    run = functools.partial(_run, config, rows=rows, subjects_uri=subjects_uri, subjects_json=subjects_json,
                            force=force, verbose=verbose, shard_json=shard_json)
    if not is_gcs(output):
        return run(Path(output))
    # kfp.local writes task outputs to a local pipeline root; results are published to GCS after.
    with tempfile.TemporaryDirectory(prefix="dreambooth-run-") as staging:
        return run(Path(staging), publish_to=output.rstrip("/"))


def _run(
    config: RunConfig, output_dir: Path, rows: list, subjects_uri: str, subjects_json: str,
    force: bool, verbose: bool, shard_json: str = "", publish_to: Optional[str] = None,
) -> int:
    from dreambooth.dag.pipeline import PIPELINE_NAME, build_pipeline
    from dreambooth.catalogue.planning import read_plan

    tracking_uri = resolve_tracking_uri(config.tracking.uri)
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": tracking_uri})})
    # Create the store and experiment once, here, before parallel tasks race to set up a fresh database.
    experiment_id(tracking_uri, config.tracking.experiment)
    for outcome in sync_spooled(Path(config.storage.work_dir) / SPOOL_FOLDER, tracking_uri):
        print(f"tracking: sent {outcome.sent} step metrics an earlier run kept on disk (run {outcome.run_id})" if not outcome.error
              else f"tracking: could not yet send step metrics of run {outcome.run_id}: {outcome.error}")
    pipeline_root = output_dir.resolve() / "kfp"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    # Where this run's state goes, first: a run started from another folder has another default store.
    print(f"outputs:      {publish_to or output_dir.resolve()}")
    print(f"tracking:     {tracking_uri} (experiment {config.tracking.experiment!r})", flush=True)
    with local_pipelines(pipeline_root, PIPELINE_NAME) as runs, RunConsole(runs.job_folder, rows, verbose) as console:
        # Locally, no cluster settings: kfp.local ignores them.
        try:
            failed_task = runs.run(build_pipeline(config), {**run_parameters(config, subjects_uri, subjects_json, force), "shard": shard_json})
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: no exit handler runs; close what the job opened
            _close_stopped_job(tracking_uri, config.tracking.experiment, runs.job_folder(), str(stop) or "interrupted")
            raise

    job_dir = runs.job_folder()
    if job_dir is None:
        raise RuntimeError(f"{pipeline_root}: the local run wrote no job folder")
    batch = find_batch_run(tracking_uri, config.tracking.experiment, job_name=job_dir.name)
    print()
    print(f"job:          {job_dir.name}")
    logs = job_dir / "logs"
    if publish_to:  # the local folder is a staging folder that goes when the run ends
        logs = upload_folder(logs, f"{publish_to}/{job_dir.name}/logs")
    print(f"task logs:    {logs}")
    # batch-failures fails the run on purpose when a subject failed: the subjects' lines say why.
    broken = failed_task if failed_task and failed_task.split(" inside ")[0] != BATCH_FAILURES.name else None
    if broken:
        log = console.output.log_of(broken.split(" inside ")[0]) or job_dir / "logs" / "pipeline.log"
        print(f"error: task {broken} failed; its log: {log}", file=sys.stderr)
    if batch is None:
        print(f"error: the batch did not start; task logs under {job_dir / 'logs'}", file=sys.stderr)
        return 1
    # Where this batch's files are, on its run: forget finds them there, from any folder, whatever --output-dir was.
    client(tracking_uri).set_tag(batch.info.run_id, TAG_OUTPUTS, f"{publish_to}/{job_dir.name}" if publish_to else str(job_dir))
    print(f"mlflow run:   {batch.info.run_id} ({tracking_uri}, experiment {config.tracking.experiment!r})")
    if TAG_ERROR in batch.data.tags:
        for line in batch.data.tags[TAG_ERROR].splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    plan = read_plan(tracking_uri, batch.info.run_id)
    rows = collect_rows(tracking_uri, plan)
    print(f"batch:        {headline(rows)}")
    for row in rows:
        print()
        _print_subject(row, publish_to and f"{publish_to}/{job_dir.name}/{row.subject}")
    if any(subject.experiment for subject in plan.subjects):
        _print_experiment_tables(tracking_uri, batch.info.run_id)
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


def _run_shards(config: RunConfig, output: str, subjects_uri: str, force: bool, verbose: bool) -> int:
    """Plan the whole file, run each shard with work as a kfp.local job of its own, then report the batch
    across the shards; 1 when any shard failed."""
    from dreambooth.dag.pipeline import PIPELINE_NAME
    from dreambooth.catalogue.subjects import entries_to_json
    from dreambooth.catalogue.planning import read_plan
    from dreambooth.tasks.batch import exit_handler_task
    from dreambooth.tasks.launch import launch_shards
    from dreambooth.tracking import close_batch_run_of_job

    tracking_uri = resolve_tracking_uri(config.tracking.uri)
    experiment_id(tracking_uri, config.tracking.experiment)
    job_id = f"local-{uuid.uuid4().hex[:12]}"
    job_name = f"{PIPELINE_NAME}-shards-{time.strftime('%Y%m%d-%H%M%S')}"
    outcomes = []

    def launch(shard, entries) -> str:
        print(f"\n== shard {shard.label}: {len(entries)} subject(s)")
        outcomes.append(_run_subjects(config, output, entries, subjects_json=entries_to_json(entries), force=force,
                                      verbose=verbose, shard_json=shard.to_json()))
        return f"kfp.local, exit {outcomes[-1]}"

    try:
        shards = launch_shards(config.to_json(), tracking_uri, subjects_uri, force, job_id, job_name, launch)
    except KeyboardInterrupt as stop:
        close_batch_run_of_job(tracking_uri, config.tracking.experiment, job_id, "KILLED", f"the local run was {str(stop) or 'interrupted'}")
        raise
    except BaseException:
        close_batch_run_of_job(tracking_uri, config.tracking.experiment, job_id, "FAILED")
        raise
    batch = find_batch_run(tracking_uri, config.tracking.experiment, job_id=job_id)
    if not shards:  # nothing launched: as the launcher's exit handler on a cluster, close it and tell tracking.notify
        exit_handler_task(config.to_json(), tracking_uri, job_id, "SUCCEEDED")
    rows = collect_rows(tracking_uri, read_plan(tracking_uri, batch.info.run_id))
    print()
    print(f"batch:        {headline(rows)}, in {len(shards)} shard(s) of at most {config.batch.max_subjects_per_run}")
    for row in rows:
        if not shards or row.status == UP_TO_DATE:  # the shards printed their own subjects
            print(f"{row.subject} ({row.class_noun}): {row.status}")
    print(f"mlflow run:   {batch.info.run_id} ({tracking_uri}, experiment {config.tracking.experiment!r}): the batch across its shards")
    return max(outcomes, default=0)


def _close_stopped_job(tracking_uri: str, experiment: str, job_dir: Optional[Path], reason: str) -> None:
    """The batch run and every run under it still open, closed as KILLED with the reason (a rerun resumes
    the training from its checkpoint, under runs of its own)."""
    from dreambooth.process import unwinding
    from dreambooth.tracking import close_batch_run

    unwinding()
    batch = find_batch_run(tracking_uri, experiment, job_name=job_dir.name) if job_dir is not None else None
    if batch is not None:
        close_batch_run(tracking_uri, experiment, batch, "KILLED", f"the local run was {reason}")


def _print_experiment_tables(tracking_uri: str, batch_run_id: str) -> None:
    """The paper's tables the batch logged (experiment/ on its run), as Markdown."""
    from dreambooth.tasks.batch import EXPERIMENT_ARTIFACTS
    from dreambooth.tracking import client

    with tempfile.TemporaryDirectory() as scratch:
        try:
            folder = Path(client(tracking_uri).download_artifacts(batch_run_id, EXPERIMENT_ARTIFACTS, scratch))
        except Exception as error:  # the summary never logged them (it failed): say so, the subjects' lines stand
            print(f"\nexperiment tables: not logged on the batch run ({str(error).splitlines()[0]})")
            return
        print()
        print((folder / "tables.md").read_text())
        print(f"experiment:   tables.md, tables.csv and a PNG per table under `{EXPERIMENT_ARTIFACTS}/` of mlflow run {batch_run_id}")


def _local_outputs(row: SubjectRow) -> dict[str, Path]:
    """The subject's result files and folders on this machine, by label."""
    if not row.model or is_gcs(row.model):
        return {}
    model = Path(row.model)
    found = {"model": model}
    if row.status != UP_TO_DATE:  # kfp.local puts every task of a subject under one iteration folder
        iteration = model.parent.parent
        found.update({
            "sample grid": iteration / SAMPLES.name / "sample_images" / "samples-grid.png",
            "upscaler": iteration / SUPER_RESOLUTION.name / "upscaler",
            "evaluation": iteration / EVALUATE.name / "evaluation" / "report.md",
        })
    def present(path: Path) -> bool:  # a file, or a result folder: a pipeline, one that loads on its base, a baseline's photos
        return path.is_file() or any((path / name).is_file() for name in ("model_index.json", METADATA_FILE, *RESULT_ON_BASE_FILES))

    return {label: path for label, path in found.items() if present(path)}


def _print_subject(row: SubjectRow, publish_to: Optional[str]) -> None:
    """The subject's outcome and where its results are (published to gs:// first when asked)."""
    if row.status == FAILED:
        print(f"{row.subject} ({row.class_noun}): failed at {row.reason}")
        print(f"  mlflow run:   {row.mlflow_run}")
        return
    seconds = f" in {row.training_seconds:.0f} s" if row.training_seconds is not None and row.status != UP_TO_DATE else ""
    if row.steps == 0:  # training.method reference: the zero-shot baseline
        seconds = ": nothing trained, a reference-image model draws from the photos"
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
    if row.selected_step is not None and row.status != UP_TO_DATE:
        print(f"  checkpoint:   step {steps_cell(row.steps, row.selected_step)}, chosen by evaluation.select (reason on the run)")
    if row.gate:
        gate = f"passed, registered as {row.registered}" if row.gate == "passed" else f"rejected ({row.reason.removeprefix('gate: ')})"
        print(f"  quality gate: {gate}")
    print(f"  mlflow run:   {row.mlflow_run}")
