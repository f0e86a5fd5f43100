"""The batch's own tasks: plan it, hand each subject its class priors, summarise, close.

    plan-batch -> prior-groups -> [class priors per group] -> assign-priors -> [stages per subject]
               -> summarize -> (batch-failures when any subject failed)
"""

from __future__ import annotations

import functools
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from dreambooth.catalogue.planning import PLAN_ARTIFACT, BatchPlan, group_priors, plan_batch, read_plan, subjects_with_priors
from dreambooth.config import RunConfig
from dreambooth.errors import InputError
from dreambooth.catalogue.forgotten import forgotten_ids, redact, without_subject_entry
from dreambooth.process import task_entry
from dreambooth.catalogue.shards import Shard
from dreambooth.progress import DONE, FAILED as STAGE_FAILED, RUNNING, StageProgress
from dreambooth.stages import BATCH, CLASS_PRIORS, FINISH_TRACKING, NOTIFY, PLAN_BATCH, SUMMARIZE, Stage
from dreambooth.storage import content_digests_of, read_text
from dreambooth.catalogue.subjects import entries_from_json, parse_subjects
from dreambooth.reports.summary import collect_rows, counts, headline, log_summary
from dreambooth.tracking.cost import budget_refusal, summed
from dreambooth.tracking import (
    FAILED,
    TAG_ERROR,
    TAG_JOB_ID,
    TAG_JOB_NAME,
    TAG_PARENT,
    TAG_SHARD,
    TAG_SHARDS,
    child_runs,
    client,
    close_batch_run,
    find_batch_run,
    log_metrics,
    open_batch_run,
    record_failure,
    shard_runs,
    subject_run_opener,
    trained_run_finder,
    trained_subjects,
)

EXPERIMENT_ARTIFACTS = "experiment"  # an experiment's tables, on its batch run


def batch_stage(stage: Stage):
    """The task's progress lines as the batch's `stage`: running, then done or failed with the reason."""

    def decorate(task):
        @task_entry
        @functools.wraps(task)
        def wrapper(*args, **kwargs):
            progress = StageProgress(BATCH, stage.name)
            progress.state(RUNNING)
            try:
                result = task(*args, **kwargs)
            except BaseException as error:
                exit_code = isinstance(error, SystemExit)  # the task printed its reason already
                progress.state(STAGE_FAILED, f"exited ({error})" if exit_code else (str(error).splitlines() or [type(error).__name__])[0])
                raise
            progress.state(DONE)
            return result

        return wrapper

    return decorate


@batch_stage(PLAN_BATCH)
def plan_task(
    config_json: str, tracking_uri: str, subjects_uri: str, subjects_json: str, force: bool,
    job_id: str, job_name: str, plan_path: str, run_settings: Optional[dict] = None, shard_json: str = "",
) -> int:
    """Read and validate the subjects (the file is read now, when the run starts), fingerprint them,
    open the batch run and a run per subject to train; returns how many subjects will train.
    shard_json: this run is one shard of a sharded batch (dreambooth.catalogue.shards), its subjects inline."""
    shared = shared_settings(config_json, run_settings)
    batch_run_id = open_batch_run(tracking_uri, shared, job_id, job_name)
    mlflow = client(tracking_uri)
    if shard_json:
        shard = Shard.from_json(shard_json)
        mlflow.set_tag(batch_run_id, TAG_PARENT, shard.batch_run_id)
        mlflow.set_tag(batch_run_id, TAG_SHARD, shard.label)
    entries = batch_subjects(shared, tracking_uri, batch_run_id, subjects_uri, subjects_json)
    opener = subject_run_opener(tracking_uri, batch_run_id)
    if shard_json:  # its batch was planned and its budget checked whole: a look-up per subject of the shard,
        # not the experiment's every trained run read again by each of a catalogue's hundreds of shards
        planned = plan_batch(entries, shared, content_digests_of, trained_run_finder(tracking_uri, shared.tracking.experiment), opener, force)
    else:  # the MLflow look-ups of the whole plan: one paged search and one listing, not one of each per subject
        trained = trained_subjects(tracking_uri, shared.tracking.experiment)
        planned = plan_batch(entries, shared, content_digests_of, lambda fingerprint: trained[fingerprint].info.run_id if fingerprint in trained else None,
                             opener, force, budget_guard(shared, trained, tracking_uri, batch_run_id))
    plan = BatchPlan(batch_run_id, planned, group_priors(planned))
    Path(plan_path).parent.mkdir(parents=True, exist_ok=True)
    Path(plan_path).write_text(plan.to_json())
    mlflow.log_text(batch_run_id, plan.to_json(), PLAN_ARTIFACT)
    log_metrics(mlflow, batch_run_id, {
        "subjects": len(planned), "subjects_to_train": len(plan.to_train),
        "subjects_up_to_date": len(planned) - len(plan.to_train), "prior_groups": len(plan.prior_groups),
    })
    report_planned(tracking_uri, planned)
    return len(plan.to_train)


def shared_settings(config_json: str, run_settings: Optional[dict]) -> RunConfig:
    """The batch's settings, with the run's own setting parameters over them; a bad one exits 2 in one line."""
    try:
        return RunConfig.from_json(config_json).with_run_settings(run_settings or {})
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def batch_subjects(shared: RunConfig, tracking_uri: str, batch_run_id: str, subjects_uri: str, subjects_json: str) -> list:
    """The subjects file (or inline entries), checked, less the subjects `forget` removed; the file as
    read (without them) logged on the batch run. Every problem of the file exits 2, one line each."""
    mlflow = client(tracking_uri)
    text, file_name = "", subjects_uri.rsplit("/", 1)[-1]
    try:
        if subjects_uri:
            text = read_text(subjects_uri)
            entries = parse_subjects(text, subjects_uri, shared)
        else:
            entries = entries_from_json(subjects_json, shared)
    except InputError as error:
        if text:
            mlflow.log_text(batch_run_id, text, f"subjects/{file_name}")
        mlflow.set_tag(batch_run_id, TAG_ERROR, str(error)[:5000])
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    # A subject `forget` removed is not trained again, nor named in this batch's records.
    forgotten = forgotten_ids(tracking_uri, shared.tracking.experiment, [entry.id for entry in entries])
    entries = [entry for entry in entries if entry.id not in forgotten]
    if text:
        for subject in forgotten:
            text = redact(without_subject_entry(text, file_name, subject), [subject])
        mlflow.log_text(batch_run_id, text, f"subjects/{file_name}")
    if forgotten:
        print(f"{len(forgotten)} subject(s) of the file were forgotten (dreambooth forget) and are skipped")
    return entries


def budget_guard(shared: RunConfig, trained: dict, tracking_uri: str, batch_run_id: str):
    """plan_batch's before_opening: batch.budget refuses the batch (exit 2, one line) before any subject
    run opens, and so before any task after the plan."""

    def within_budget(to_train: int) -> None:
        refusal = budget_refusal(shared.batch.budget, to_train, list(trained.values()), shared.cost.currency)
        if refusal:
            client(tracking_uri).set_tag(batch_run_id, TAG_ERROR, refusal)
            print(f"error: {refusal}", file=sys.stderr)
            raise SystemExit(2)

    return within_budget


def report_planned(tracking_uri: str, planned: list) -> None:
    """A line per subject; a refused subject's reason recorded on its run (its stages then do nothing)."""
    for subject in planned:
        if subject.refused:
            record_failure(tracking_uri, subject.subject_run_id, PLAN_BATCH.name, f"refused: {subject.refused}")
            print(f"{subject.subject_id}: refused: {subject.refused}")
        else:
            print(f"{subject.subject_id}: {'up to date (run ' + subject.up_to_date_run_id + ')' if subject.up_to_date else 'to train'}")


def _plan(plan_path: str) -> BatchPlan:
    return BatchPlan.from_json(Path(plan_path).read_text())


@task_entry
def prior_groups_task(plan_path: str) -> list:
    """The class-prior fan-out's items: one per group of subjects that share class images."""
    plan = _plan(plan_path)
    groups = [
        {"prior_key": group.prior_key, "class_noun": group.class_noun, "config_json": group.config_json, "batch_run_id": plan.batch_run_id}
        for group in plan.prior_groups
    ]
    # kfp.local cannot collect from a loop that ran no iteration: without any group (no subject
    # uses prior preservation), one empty group stands in and its task returns at once.
    return groups or [{"prior_key": "", "class_noun": "", "config_json": "{}", "batch_run_id": plan.batch_run_id}]


@task_entry
def assign_priors_task(tracking_uri: str, plan_path: str, prior_outcomes: list) -> list:
    """The subject fan-out's items, each with its group's class images; a failed group fails its subjects."""
    plan = _plan(plan_path)
    items, failed = subjects_with_priors(plan, prior_outcomes)
    run_ids = {subject.subject_id: subject.subject_run_id for subject in plan.to_train}
    for subject_id, reason in failed.items():
        record_failure(tracking_uri, run_ids[subject_id], CLASS_PRIORS.name, reason)
    return items


@batch_stage(SUMMARIZE)
def summary_task(tracking_uri: str, plan_path: str, job_name: str, subject_statuses: list, markdown_path: str, html_path: str) -> int:
    """Close the subject runs, log the summary (table, Markdown, HTML with the sample grids) on the
    batch run and write the KFP outputs; returns how many subjects failed."""
    plan = _plan(plan_path)
    rows, markdown, page = log_summary(tracking_uri, plan, job_name, close_runs=True)
    tally = counts(rows)
    mlflow = client(tracking_uri)
    spent = summed(child_runs(tracking_uri, mlflow.get_run(plan.batch_run_id)))  # its subjects' (closed above) and class priors'
    log_metrics(mlflow, plan.batch_run_id, {**{f"subjects_{status.replace(' ', '_')}": n for status, n in tally.items()}, **spent})
    for path, text in ((markdown_path, markdown), (html_path, page)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(markdown)
    if any(subject.experiment for subject in plan.subjects):
        print(log_experiment_tables(tracking_uri, plan, f"Experiment {job_name}"))
    print(f"stage statuses reported by the subject fan-out: {', '.join(map(str, subject_statuses)) or 'none'}")
    return tally[FAILED]


def log_experiment_tables(tracking_uri: str, plan: BatchPlan, title: str) -> str:
    """The paper's tables from an experiment's runs, logged on its batch run (experiment/); returns the Markdown."""
    from dreambooth.reports.paper_tables import as_markdown, experiment_runs, fill_tables, write_tables

    tables = fill_tables(experiment_runs(tracking_uri, plan))
    with tempfile.TemporaryDirectory() as scratch:
        for path in write_tables(tables, title, Path(scratch)):
            client(tracking_uri).log_artifact(plan.batch_run_id, str(path), EXPERIMENT_ARTIFACTS)
    return as_markdown(tables, title)


@task_entry
def batch_failures_task(tracking_uri: str, plan_path: str) -> None:
    """Fail the pipeline run, naming the subjects that failed (the others finished)."""
    rows = collect_rows(tracking_uri, _plan(plan_path))
    failed = [f"{row.subject} ({row.reason})" for row in rows if row.status == FAILED]
    print(f"error: {headline(rows)}; failed: {'; '.join(failed)}", file=sys.stderr)
    raise SystemExit(1)


@batch_stage(FINISH_TRACKING)
def exit_handler_task(config_json: str, tracking_uri: str, job_id: str, pipeline_state: str) -> None:
    """Exit handler: close the batch run, and any run a crashed or killed stage left open; then
    tell the webhooks of tracking.notify how the batch ended."""
    config = RunConfig.from_json(config_json)
    batch = find_batch_run(tracking_uri, config.tracking.experiment, job_id)
    if shards_running(batch, pipeline_state):
        return  # the launch of a sharded batch: its last shard to end closes the batch run
    batch_run_id = close_batch_run(tracking_uri, config.tracking.experiment, batch, pipeline_state) if batch is not None else None
    if batch_run_id:
        shard_end = close_when_shards_end(tracking_uri, batch_run_id)
        if shard_end is not None:  # one word a night for a catalogue, not one per shard: the last shard to end tells of them all
            if not shard_end.closed:
                return
            batch_run_id, job_id, pipeline_state = shard_end.batch_run_id, shard_end.job_id, shard_end.state
    if not config.tracking.notify:
        return
    from dreambooth.tracking.notify import send

    try:
        report = batch_report(config, tracking_uri, job_id, pipeline_state, batch_run_id)
    except Exception as error:  # a report with less in it beats no word at all
        report = batch_report(config, tracking_uri, job_id, pipeline_state, None, f"the batch summary could not be read: {error}")
    outcomes = send(config.tracking.notify, report)
    sent = all(outcome.startswith("sent") for outcome in outcomes)
    StageProgress(BATCH, NOTIFY.name).state(DONE if sent else STAGE_FAILED, "; ".join(outcomes))


def shards_running(batch, pipeline_state: str) -> bool:
    """The job (its batch run `batch`) launched the shards of a sharded batch and ended well: they
    now run on their own."""
    succeeded = pipeline_state.upper() in ("SUCCEEDED", "SUCCESS")
    return succeeded and batch is not None and int(batch.data.tags.get(TAG_SHARDS, "0")) > 0


def batch_report(config: RunConfig, tracking_uri: str, job_id: str, pipeline_state: str, batch_run_id, error: str = ""):
    """What the notification says: the final state, each subject's outcome and headline figures, links."""
    from dreambooth.tracking.notify import BatchReport, SubjectOutcome

    settings = config.tracking
    if batch_run_id is None:
        return BatchReport(pipeline_state, job_id, job_id, settings.experiment, {}, [], kfp_url=_kfp_link(config, job_id),
                           error=error or "the batch did not start (planning failed)")
    batch = client(tracking_uri).get_run(batch_run_id)
    rows = collect_rows(tracking_uri, read_plan(tracking_uri, batch_run_id))
    subjects = [
        SubjectOutcome(row.subject, row.class_noun, row.status, row.reason, row.gate, row.registered,
                       {name: getattr(row, name) for name in ("dino", "clip_i", "clip_t", "pres") if getattr(row, name) is not None},
                       row.mlflow_run)
        for row in rows
    ]
    ui = settings.ui_url or (tracking_uri if tracking_uri.startswith("http") else "")
    mlflow_url = f"{ui.rstrip('/')}/#/experiments/{batch.info.experiment_id}/runs/{batch_run_id}" if ui else ""
    return BatchReport(pipeline_state, job_id, batch.data.tags.get(TAG_JOB_NAME, job_id), settings.experiment, counts(rows),
                       subjects, mlflow_url, _kfp_link(config, job_id), batch.data.tags.get(TAG_ERROR, ""))


def _kfp_link(config: RunConfig, job_id: str) -> str:
    return f"{config.tracking.kfp_ui_url.rstrip('/')}/#/runs/details/{job_id}" if config.tracking.kfp_ui_url else ""



@dataclass(frozen=True)
class ShardEnd:
    """What a shard's end did to its batch: closed it (the last shard to end) or left it to the others."""
    batch_run_id: str
    job_id: str  # the launch's: the batch's own job
    state: str = ""  # SUCCEEDED or FAILED once closed

    @property
    def closed(self) -> bool:
        return bool(self.state)


def close_when_shards_end(tracking_uri: str, shard_batch_run_id: str) -> Optional[ShardEnd]:
    """After a shard's run closed: when it was the last of its batch to end, the batch's summary across all
    shards is logged on the batch run, which closes (FINISHED when every shard finished, else FAILED).
    None when the run is no shard's."""
    mlflow = client(tracking_uri)
    shard = mlflow.get_run(shard_batch_run_id)
    if TAG_SHARD not in shard.data.tags:
        return None
    batch = mlflow.get_run(shard.data.tags[TAG_PARENT])
    ended = ShardEnd(batch.info.run_id, batch.data.tags.get(TAG_JOB_ID, ""))
    shards = shard_runs(tracking_uri, batch)
    # Each shard closes its own run before it looks: of two ending together, the later one sees both closed.
    if batch.info.status != "RUNNING" or len(shards) < int(batch.data.tags.get(TAG_SHARDS, "0")) \
            or any(run.info.status == "RUNNING" for run in shards):
        return ended
    rows, _, _ = log_summary(tracking_uri, read_plan(tracking_uri, batch.info.run_id), batch.data.tags.get(TAG_JOB_NAME, ""))
    spent = summed(child_runs(tracking_uri, batch))  # its shards' sums and its own refused subjects'
    log_metrics(mlflow, batch.info.run_id, {**{f"subjects_{status.replace(' ', '_')}": n for status, n in counts(rows).items()}, **spent})
    finished = all(run.info.status == "FINISHED" for run in shards)
    mlflow.set_terminated(batch.info.run_id, "FINISHED" if finished else "FAILED")
    return replace(ended, state="SUCCEEDED" if finished else "FAILED")
