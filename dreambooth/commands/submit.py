"""The cluster path: compile the DAG with its Kubernetes settings, submit a run, schedule a recurring one.

A run's parameters carry the shared settings and *where* the subjects are (a subjects file URI),
never the list itself, so a recurring run reads the file anew at every tick and trains what was
added since the last one. A single subject (submit --subject-uri) travels inline instead. A sharded
batch (batch.max_subjects_per_run) is submitted as its launcher (dreambooth.dag.launcher). A run, like a
schedule, runs a version of a named pipeline on the host (dreambooth.commands.schedules). Where and as
whom runs are created: dreambooth.dag.kfp_runs.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional

from dreambooth.config import RunConfig
from dreambooth.errors import InputError
from dreambooth.commands.schedules import pipeline_version
from dreambooth.dag.kfp_runs import KfpTarget, compile_dag, run_parameters

CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
CRON_RANGES = {0: (0, 59), 1: (0, 59), 2: (0, 23), 3: (1, 31), 4: (1, 12), 5: (0, 7)}


LAUNCHER_PARAMETERS = ("config_json", "tracking_uri", "subjects_uri", "force")


def launcher_parameters(parameters: dict, kfp_experiment: str) -> dict:
    """A sharded batch's launcher run: the batch's parameters less the per-run ones, and where shards go."""
    from dreambooth.config import RUN_SETTINGS

    return {**{key: parameters[key] for key in (*LAUNCHER_PARAMETERS, *RUN_SETTINGS)}, "kfp_experiment": kfp_experiment}


def compile_pipeline(config: RunConfig, output: Path, on_cluster: bool = False, launcher: bool = False) -> Path:
    """Write the KFP IR YAML; the config becomes the default parameters, so a run changes by parameters only.
    launcher: the sharded batch's launcher pipeline instead of the DAG."""
    from kfp import compiler

    from dreambooth.dag.launcher import build_shard_launcher

    if on_cluster and config.cluster is None:
        raise InputError(f"config {config.name!r}: no `cluster` section; use a cluster config (e.g. --config gke-sd15)")
    if not launcher:
        return compile_dag(config, output, on_cluster)
    defaults = launcher_parameters(run_parameters(config), "")
    defaults.pop("kfp_experiment")
    compiler.Compiler().compile(build_shard_launcher(config, on_cluster), str(output), pipeline_parameters=defaults)
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


WAIT_POLL_SECONDS = 15


def check_submission(config: RunConfig, cron: Optional[str] = None) -> None:
    """What submit refuses before contacting anything: a bad cron, a config without cluster settings, a shard
    too large for one Argo workflow."""
    if cron is not None:
        validate_cron(cron)
    if config.cluster is None:
        raise InputError(f"config {config.name!r}: no `cluster` section; submit a cluster config (e.g. --config gke-sd15)")
    if config.batch.max_subjects_per_run:
        check_shard_size(config)


# What the shipped cluster config leaves for each deploy to fill in: the all-zero image digest, and the
# PROJECT / BUCKET of its registry and bucket names.
PLACEHOLDERS = re.compile(r"@sha256:0{64}\b|\bPROJECT(?:_ID)?\b|\bBUCKET\b")


def unresolved_placeholders(config: RunConfig) -> list[str]:
    """`setting: value` for each cluster or tracking setting that still holds a placeholder."""
    def named(found: str) -> str:
        return "the all-zero digest" if found.startswith("@sha256:") else found

    return [f"{setting}: {', '.join(sorted({named(found) for found in PLACEHOLDERS.findall(value)}))} still a placeholder in {value!r}"
            for setting, value in config.flat_params().items()
            if setting.startswith(("cluster.", "tracking.", "storage.")) and PLACEHOLDERS.search(value)]


def check_shard_size(config: RunConfig) -> None:
    """A shard of batch.max_subjects_per_run subjects must fit one Argo workflow (dreambooth.dag.workflow_size)."""
    import yaml

    from dreambooth.dag.workflow_size import NODE_LIMIT, subjects_within, workflow_nodes

    with tempfile.TemporaryDirectory() as scratch:
        spec = next(yaml.safe_load_all(compile_dag(config, Path(scratch) / "dag.yaml", on_cluster=True).read_text()))
    size, fits = config.batch.max_subjects_per_run, subjects_within(spec)
    if size > fits:
        raise InputError(f"batch.max_subjects_per_run: a shard of {size} subjects is a workflow of up to {workflow_nodes(spec, size):,} "
                         f"Argo nodes, over the {NODE_LIMIT:,} one run can hold; use at most {fits}")


def submit(
    config: RunConfig, target: KfpTarget, experiment: str, parameters: dict,
    run_name: str, cron: Optional[str] = None, wait_seconds: Optional[int] = None, mlflow_via: Optional[str] = None,
) -> int:
    """Compile with the cluster settings and create a run (or, with cron, a recurring run) on a KFP v2 host.

    With `wait_seconds`, follow the run to its end: exit 0 only if it succeeded.
    """
    check_submission(config, cron)
    multi_user = target.multi_user()
    namespace = target.namespace if multi_user else None
    client = target.client(multi_user)
    account = config.cluster.service_account or ""
    host = target.host.rstrip("/")
    sharded = bool(config.batch.max_subjects_per_run and parameters.get("subjects_uri"))
    if sharded:  # the launcher goes; at each run it plans the file and starts the shards with work
        parameters = launcher_parameters(parameters, experiment)
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(config, Path(scratch) / "dreambooth.yaml", on_cluster=True, launcher=sharded)
        if cron is not None:
            return _schedule(config, client, namespace, experiment, run_name, cron, package, parameters, host)
        experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
        version = pipeline_version(client, package, hosted_pipeline_name(package, config), namespace)
        result = client.run_pipeline(experiment_id, run_name, params=parameters, pipeline_id=version.pipeline_id,
                                     version_id=version.version_id, service_account=account)
    print(f"pipeline:     {version.pipeline} version {version.version}" + (" (unchanged, reused)" if version.reused else " (uploaded)"))
    print(f"run:          {result.run_id}")
    print(f"url:          {host}/#/runs/details/{result.run_id}")
    if wait_seconds is None:
        return 0
    try:
        state = str(client.wait_for_run_completion(result.run_id, timeout=wait_seconds, sleep_duration=WAIT_POLL_SECONDS).state).upper()
    except TimeoutError:
        state = f"still running after {wait_seconds} s"
    print(f"state:        {state}")
    print(f"mlflow:       {mlflow_link(config, result.run_id, mlflow_via)}")
    return 0 if state == "SUCCEEDED" else 1


def hosted_pipeline_name(package: Path, config: RunConfig) -> str:
    """The pipeline's name on the KFP host: the compiled pipeline's and the config's (dreambooth-gke-sd15)."""
    import yaml

    return f"{next(yaml.safe_load_all(package.read_text()))['pipelineInfo']['name']}-{config.name}"


def _schedule(config: RunConfig, client, namespace: Optional[str], experiment: str, name: str, cron: str, package: Path,
              parameters: dict, host: str) -> int:
    """The recurring run of this name, created or replaced, on the named pipeline's version for this package."""
    from dreambooth.commands.schedules import put_schedule

    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    version = pipeline_version(client, package, hosted_pipeline_name(package, config), namespace)
    recurring_id, replaced = put_schedule(client, experiment_id, namespace, name, cron, version, parameters,
                                          config.cluster.service_account or "", config.cluster.schedule.catch_up)
    catch_up = "on" if config.cluster.schedule.catch_up else "off (cluster.schedule.catch_up)"
    print(f"schedule:      {name} ({cron}), catch-up {catch_up}" + (f"; replaced recurring run {replaced}" if replaced else ""))
    print(f"pipeline:      {version.pipeline} version {version.version}" + (" (unchanged, reused)" if version.reused else " (uploaded)"))
    print(f"recurring run: {recurring_id}")
    print(f"url:           {host}/#/recurringrun/details/{recurring_id}")
    return 0


def mlflow_link(config: RunConfig, kfp_run_id: str, via: Optional[str] = None) -> str:
    """The batch run's page in the MLflow UI, looked up through `via` (e.g. a port-forward), else where to find it."""
    from dreambooth.tracking import TAG_JOB_ID, find_batch_run

    search = f"{config.tracking.uri}, experiment {config.tracking.experiment!r}, tag {TAG_JOB_ID} = {kfp_run_id}"
    if not via:
        return search
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a lookup, not worth minutes of retries
    try:
        run = find_batch_run(via, config.tracking.experiment, job_id=kfp_run_id)
    except Exception as error:  # the link is a convenience: the run's state is already known
        return f"{search} (lookup through {via} failed: {type(error).__name__})"
    if run is None:
        return f"{search} (no such run yet)"
    return f"{via.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
