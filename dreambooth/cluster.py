"""The cluster path: compile the DAG with its Kubernetes settings, submit a run, schedule a recurring one.

A run's parameters carry the shared settings and *where* the subjects are (a subjects file URI),
never the list itself, so a recurring run reads the file anew at every tick and trains what was
added since the last one. A single subject (submit --subject-uri) travels inline instead.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Callable, Optional

from dreambooth.config import RunConfig
from dreambooth.errors import InputError

CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
CRON_RANGES = {0: (0, 59), 1: (0, 59), 2: (0, 23), 3: (1, 31), 4: (1, 12), 5: (0, 7)}


def run_parameters(config: RunConfig, subjects_uri: str = "", subjects_json: str = "", force: bool = False) -> dict:
    """The pipeline's runtime parameters: shared settings, the subjects' location (or inline entries)."""
    return {
        "config_json": config.to_json(),
        "tracking_uri": config.tracking.uri or "",
        "subjects_uri": subjects_uri,
        "subjects_json": subjects_json,
        "force": force,
        "superres_enabled": config.superres.enabled,
    }


def compile_pipeline(build_pipeline: Callable, config: RunConfig, output: Path, on_cluster: bool = False) -> Path:
    """Write the KFP IR YAML; the config becomes the default parameters, so a run changes by parameters only."""
    from kfp import compiler

    if on_cluster and config.cluster is None:
        raise InputError(f"config {config.name!r}: no `cluster` section; use a cluster config (e.g. --config gke-sd15)")
    compiler.Compiler().compile(build_pipeline(config, on_cluster), str(output), pipeline_parameters=run_parameters(config))
    return output


def validate_cron(expression: str) -> str:
    """KFP recurring runs take 6-field cron, seconds first; refuse anything else in one line."""
    fields = expression.split()
    example = "e.g. '0 0 9 * * 1-5' for 09:00 on weekdays"
    if len(fields) != 6:
        raise InputError(f"--cron: {expression!r} has {len(fields)} fields; KFP cron has 6, seconds first ({example})")
    for index, field in enumerate(fields):
        if not re.fullmatch(r"[0-9A-Za-z*?/,\-#LW]+", field):
            raise InputError(f"--cron: {CRON_FIELDS[index]} field {field!r} has characters cron does not use")
        low, high = CRON_RANGES[index]
        for number in re.findall(r"\d+", field.split("/")[0]):
            if not low <= int(number) <= high:
                raise InputError(f"--cron: {CRON_FIELDS[index]} {number} is outside {low}-{high} ({example})")
    return expression


def submit(
    build_pipeline: Callable, config: RunConfig, host: str, experiment: str, parameters: dict,
    run_name: str, cron: Optional[str] = None,
) -> int:
    """Compile with the cluster settings and create a run (or, with cron, a recurring run) on a KFP v2 host."""
    import kfp

    if cron is not None:
        validate_cron(cron)
    if config.cluster is None:
        raise InputError(f"config {config.name!r}: no `cluster` section; submit a cluster config (e.g. --config gke-sd15)")
    client = kfp.Client(host=host)
    account = config.cluster.service_account or ""
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(build_pipeline, config, Path(scratch) / "dreambooth.yaml", on_cluster=True)
        if cron is None:
            result = client.create_run_from_pipeline_package(
                str(package), arguments=parameters, run_name=run_name, experiment_name=experiment, service_account=account
            )
            print(f"run:          {result.run_id}")
            print(f"url:          {host.rstrip('/')}/#/runs/details/{result.run_id}")
            return 0
        experiment_id = client.create_experiment(experiment).experiment_id
        recurring = client.create_recurring_run(
            experiment_id=experiment_id, job_name=run_name, cron_expression=cron, pipeline_package_path=str(package),
            params=parameters, service_account=account,
        )
        print(f"recurring run: {recurring.recurring_run_id} ({cron})")
        print(f"url:           {host.rstrip('/')}/#/recurringrun/details/{recurring.recurring_run_id}")
        return 0
