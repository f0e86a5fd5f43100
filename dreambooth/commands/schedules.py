"""Schedules: KFP recurring runs managed by name, as operators manage cron jobs.

A schedule is the recurring run of that name in its KFP experiment. `dreambooth schedule` creates it,
and run again with the same name replaces it (KFP cannot edit a recurring run in place): there is
never a second one by accident. `dreambooth schedules list|pause|resume|delete` find it by name.

Its pipeline is a named pipeline on the host (`<pipeline>-<config>`, e.g. dreambooth-gke-sd15), with
a version per compiled digest: a schedule made again from an unchanged config reuses the version, a
changed config adds one, and the KFP UI shows which version each night ran. Catch-up is off unless
cluster.schedule.catch_up: after downtime KFP would otherwise start every missed night at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dreambooth.errors import InputError

EQUALS = 1  # KFP's filter operation code (kfp.client.client._FILTER_OPERATIONS)
PAGE_SIZE = 100


def _named(name: str) -> str:
    return json.dumps({"predicates": [{"operation": EQUALS, "key": "display_name", "stringValue": name}]})


@dataclass(frozen=True)
class PipelineVersion:
    pipeline: str  # the pipeline's name on the host
    pipeline_id: str
    version: str  # the version's name: the compiled package's digest
    version_id: str
    reused: bool  # an unchanged config: the version was there already


def package_digest(package: Path) -> str:
    return hashlib.sha256(package.read_bytes()).hexdigest()[:12]


def pipeline_version(client, package: Path, pipeline: str, namespace: Optional[str]) -> PipelineVersion:
    """The named pipeline's version holding this package, uploaded only when no version of its digest exists."""
    digest = package_digest(package)
    pipeline_id = client.get_pipeline_id(pipeline)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline, namespace=namespace).pipeline_id
    found = client.list_pipeline_versions(pipeline_id, page_size=PAGE_SIZE, filter=_named(digest)).pipeline_versions or []
    if found:
        return PipelineVersion(pipeline, pipeline_id, digest, found[0].pipeline_version_id, reused=True)
    version = client.upload_pipeline_version(str(package), digest, pipeline_id=pipeline_id)
    return PipelineVersion(pipeline, pipeline_id, digest, version.pipeline_version_id, reused=False)


def find_schedule(client, experiment_id: str, namespace: Optional[str], name: str):
    """The recurring run of this name in the experiment, or None."""
    found = client.list_recurring_runs(experiment_id=experiment_id, namespace=namespace, page_size=PAGE_SIZE,
                                       filter=_named(name)).recurring_runs or []
    return found[0] if found else None


def put_schedule(client, experiment_id: str, namespace: Optional[str], name: str, cron: str, version: PipelineVersion,
                 parameters: dict, service_account: str, catch_up: bool) -> tuple[str, Optional[str]]:
    """Create the schedule, or replace the one of the same name: (the new recurring run's id, the replaced one's)."""
    existing = find_schedule(client, experiment_id, namespace, name)
    if existing is not None:
        client.delete_recurring_run(existing.recurring_run_id)
    created = client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=cron, params=parameters, pipeline_id=version.pipeline_id,
        version_id=version.version_id, no_catchup=not catch_up, max_concurrency=1, service_account=service_account,
    )
    return created.recurring_run_id, existing.recurring_run_id if existing is not None else None


def _cron_of(recurring) -> str:
    trigger = recurring.trigger
    schedule = trigger.cron_schedule if trigger else None
    return schedule.cron if schedule else "-"


def list_schedules(client, experiment_id: str, namespace: Optional[str]) -> list[str]:
    """A line per schedule of the experiment: name, state, cron, catch-up, pipeline version, id."""
    runs, token = [], ""
    while True:
        page = client.list_recurring_runs(experiment_id=experiment_id, namespace=namespace, page_size=PAGE_SIZE, page_token=token)
        runs += page.recurring_runs or []
        token = page.next_page_token or ""
        if not token:
            break
    lines = []
    for run in sorted(runs, key=lambda run: run.display_name or ""):
        state = "paused" if str(run.mode).upper().endswith("DISABLE") else "active"
        reference = run.pipeline_version_reference
        version = reference.pipeline_version_id if reference else "inline package"
        catch_up = "catch-up off" if run.no_catchup else "catch-up on"
        lines.append(f"{run.display_name:<32} {state:<7} {_cron_of(run):<18} {catch_up:<13} version {version}  id {run.recurring_run_id}")
    return lines


def change_schedule(client, experiment_id: str, namespace: Optional[str], name: str, action: str) -> str:
    """pause, resume or delete the schedule of this name; InputError naming it when there is none."""
    found = find_schedule(client, experiment_id, namespace, name)
    if found is None:
        raise InputError(f"--name: no schedule {name!r} in this experiment (dreambooth schedules list shows them)")
    {"pause": client.disable_recurring_run, "resume": client.enable_recurring_run,
     "delete": client.delete_recurring_run}[action](found.recurring_run_id)
    return found.recurring_run_id
