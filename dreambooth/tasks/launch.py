"""Launching a sharded batch (dreambooth.catalogue.shards): plan the whole file, start a pipeline run per shard.

Locally `dreambooth run` calls `launch_shards` itself and runs each shard through kfp.local; on a
cluster, the launcher pipeline's one task does (`launch_shards_task`) and creates the shards' runs
through the KFP API.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Callable, Optional

from dreambooth.catalogue.planning import PLAN_ARTIFACT, BatchPlan, plan_batch
from dreambooth.catalogue.shards import SHARDS_ARTIFACT, Shard, split_into_shards
from dreambooth.stages import LAUNCH_SHARDS
from dreambooth.storage import content_digests_of
from dreambooth.catalogue.subjects import SubjectEntry
from dreambooth.reports.summary import log_summary, subject_row
from dreambooth.tasks.batch import batch_stage, batch_subjects, budget_guard, report_planned, shared_settings
from dreambooth.tracking import TAG_SHARDS, client, log_metrics, open_batch_run, subject_run_opener, trained_subjects

# launch(shard, its subjects' entries) -> what runs it (a KFP run id, a local job's outcome)
Launch = Callable[[Shard, list[SubjectEntry]], str]


def launch_shards(
    config_json: str, tracking_uri: str, subjects_uri: str, force: bool, job_id: str, job_name: str,
    launch: Launch, run_settings: Optional[dict] = None,
) -> list[Shard]:
    """Open the batch run, plan every subject of the file, and launch a shard per batch.max_subjects_per_run
    subjects with work; up-to-date and refused subjects stay on the batch run. Returns the shards."""
    shared = shared_settings(config_json, run_settings)
    batch_run_id = open_batch_run(tracking_uri, shared, job_id, job_name)
    mlflow = client(tracking_uri)
    entries = batch_subjects(shared, tracking_uri, batch_run_id, subjects_uri, "")
    trained = trained_subjects(tracking_uri, shared.tracking.experiment)
    open_here = subject_run_opener(tracking_uri, batch_run_id)
    planned = plan_batch(
        entries, shared, content_digests_of, lambda fingerprint: trained[fingerprint].info.run_id if fingerprint in trained else None,
        # Only a refused subject gets its run here (to say why); the others get theirs in their shard.
        lambda config, fingerprint: open_here(config, fingerprint) if config.consent_refusal() else "",
        force, budget_guard(shared, trained, tracking_uri, batch_run_id),
    )
    kept = [subject for subject in planned if subject.up_to_date or subject.refused]
    plan = BatchPlan(batch_run_id, kept)
    mlflow.log_text(batch_run_id, plan.to_json(), PLAN_ARTIFACT)
    report_planned(tracking_uri, planned)
    for subject in kept:
        if subject.refused:  # nothing more happens to it: its run closes now
            subject_row(tracking_uri, subject.subject_run_id, close=True)
    with_work = [subject.subject_id for subject in planned if not (subject.up_to_date or subject.refused)]
    shards = split_into_shards(batch_run_id, with_work, shared.batch.max_subjects_per_run or max(1, len(with_work)))
    mlflow.set_tag(batch_run_id, TAG_SHARDS, str(len(shards)))
    log_metrics(mlflow, batch_run_id, {"subjects": len(planned), "subjects_to_train": len(with_work),
                                       "subjects_up_to_date": sum(subject.up_to_date for subject in planned), "shards": len(shards)})
    if not shards:  # nothing to train: the summary is the plan's, written now, from the runs the plan read
        log_summary(tracking_uri, plan, job_name, known_runs={run.info.run_id: run for run in trained.values()})
    by_id = {entry.id: entry for entry in entries}
    launched = []
    try:
        for shard in shards:
            print(f"shard {shard.label}: {', '.join(shard.subjects)}")
            launched.append({**asdict(shard), "launched": launch(shard, [by_id[subject] for subject in shard.subjects])})
    finally:  # a launch that failed part-way leaves the record of what it started
        if shards:
            mlflow.log_text(batch_run_id, json.dumps(launched, indent=2), SHARDS_ARTIFACT)
    return shards


launch_shards_task = batch_stage(LAUNCH_SHARDS)(launch_shards)
