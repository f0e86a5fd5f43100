"""The one place that knows the MLflow run layout.

One parent run per pipeline run, found (or created) by its KFP job id, so tasks in separate
processes or pods share it without passing ids around; one child run per stage, carrying
the parent's identifying tags. Everything goes through MlflowClient with explicit run ids:
no process-global active run.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from dreambooth.config import RunConfig

log = logging.getLogger(__name__)

TAG_JOB_ID = "kfp.job_id"
TAG_JOB_NAME = "kfp.job_name"
TAG_TASK_NAME = "kfp.task_name"
TAG_STAGE = "dreambooth.stage"
TAG_SUBJECT = "dreambooth.subject"
TAG_CLASS_NOUN = "dreambooth.class_noun"
TAG_IDENTIFIER = "dreambooth.identifier"
TAG_ERROR = "dreambooth.error"
TAG_FAILED_STAGE = "dreambooth.failed_stage"
TAG_MODEL_URI = "dreambooth.model_uri"
TAG_GATE = "dreambooth.gate"
TAG_GATE_REASON = "dreambooth.gate_reason"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
INHERITED_TAGS = (TAG_JOB_ID, TAG_JOB_NAME, TAG_SUBJECT, TAG_CLASS_NOUN, TAG_IDENTIFIER)
METRIC_FLUSH_EVERY = 100


def resolve_tracking_uri(configured: Optional[str] = None) -> str:
    """--tracking-uri / config, else $MLFLOW_TRACKING_URI, else ./mlflow.db (MLflow's embedded default)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another task created it first
        return client.get_experiment_by_name(name).experiment_id


def find_parent_run(tracking_uri: str, experiment: str, job_id: str = "", job_name: str = ""):
    """The pipeline run's parent MLflow run, by KFP job id or job name; None if never opened."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    key, value = (TAG_JOB_ID, job_id) if job_id else (TAG_JOB_NAME, job_name)
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{key}` = '{value}' and tags.`{TAG_STAGE}` = 'pipeline'"
    )
    return runs[0] if runs else None


def _parent_run_id(client, config: RunConfig, tracking_uri: str, job_id: str, job_name: str, subject: str) -> str:
    existing = find_parent_run(tracking_uri, config.tracking.experiment, job_id)
    if existing is not None:
        return existing.info.run_id
    tags = {
        TAG_JOB_ID: job_id,
        TAG_JOB_NAME: job_name,
        TAG_STAGE: "pipeline",
        TAG_SUBJECT: subject,
        TAG_CLASS_NOUN: config.subject.class_noun,
        TAG_RUN_NAME: f"{subject}-{config.subject.class_noun}-{job_name}",
    }
    run = client.create_run(_experiment_id(client, config.tracking.experiment), tags=tags)
    from mlflow.entities import Param

    params = [Param(key, value[:6000]) for key, value in config.flat_params().items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return run.info.run_id


@dataclass
class StageRun:
    """A stage's child run: per-step metrics are buffered and sent in batches."""

    client: object
    run_id: str
    parent_run_id: str
    _pending: list = field(default_factory=list)

    def log_step_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step) for key, value in values.items())
        if len(self._pending) >= METRIC_FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_metrics(self, values: dict[str, float], on_parent: bool = False) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, 0) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        if on_parent:
            self.client.log_batch(self.parent_run_id, metrics=metrics)

    def set_tags(self, tags: dict[str, str], on_parent: bool = False) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        self.client.log_batch(self.run_id, tags=entries)
        if on_parent:
            self.client.log_batch(self.parent_run_id, tags=entries)

    def parent_tag(self, key: str) -> Optional[str]:
        return self.client.get_run(self.parent_run_id).data.tags.get(key)

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_file(self, path: Path, artifact_path: Optional[str] = None, on_parent: bool = False) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
        if on_parent:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path)

    def log_folder(self, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


@contextmanager
def stage_run(
    config: RunConfig,
    tracking_uri: str,
    stage: str,
    job_id: str,
    job_name: str,
    subject: str,
    task_name: str = "",
) -> Iterator[StageRun]:
    """Open the stage's child run under the job's parent run; record failures on both, then re-raise."""
    client = _client(tracking_uri)
    parent_id = _parent_run_id(client, config, tracking_uri, job_id, job_name, subject)
    parent = client.get_run(parent_id)
    tags = {key: parent.data.tags[key] for key in INHERITED_TAGS if key in parent.data.tags}
    tags.update({TAG_PARENT: parent_id, TAG_STAGE: stage, TAG_TASK_NAME: task_name or stage, TAG_RUN_NAME: stage})
    child = client.create_run(parent.info.experiment_id, tags=tags)
    run = StageRun(client=client, run_id=child.info.run_id, parent_run_id=parent_id)
    try:
        yield run
        run.flush()
    except BaseException as error:
        message = (str(error).splitlines() or [type(error).__name__])[0][:5000]
        run.flush()
        run.set_tags({TAG_ERROR: message})
        client.set_tag(parent_id, TAG_ERROR, message)
        client.set_tag(parent_id, TAG_FAILED_STAGE, stage)
        client.set_terminated(run.run_id, "FAILED")
        raise
    client.set_terminated(run.run_id, "FINISHED")


def finish_parent_run(tracking_uri: str, experiment: str, job_id: str, pipeline_state: str) -> Optional[str]:
    """Close the job's parent run with the pipeline's final state; returns its id (None if never opened)."""
    parent = find_parent_run(tracking_uri, experiment, job_id)
    if parent is None:
        return None
    status = "FINISHED" if pipeline_state.upper() in ("SUCCEEDED", "SUCCESS") else "FAILED"
    _client(tracking_uri).set_terminated(parent.info.run_id, status)
    return parent.info.run_id
