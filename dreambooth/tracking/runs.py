"""Runs in MLflow: each stage inside its run (`stage_run`), a subject's run closed with its status and
cost, and the batch run closed when the pipeline ends. Everything goes through MlflowClient with
explicit run ids: no process-global active run.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from dreambooth.config import RunConfig
from dreambooth.errors import Preempted, TrackingUnavailable
from dreambooth.stages import FINE_TUNE, Stage
from dreambooth.progress import DONE, FAILED as STAGE_FAILED, RUNNING as STAGE_RUNNING, StageProgress
from dreambooth.tracking.layout import (
    FAILED,
    INHERITED_TAGS,
    STAGE_SUBJECT,
    TAG_ATTEMPT,
    TAG_CLASS_NOUN,
    TAG_ERROR,
    TAG_FAILED_STAGE,
    TAG_JOB_ID,
    TAG_MODEL_LOCATION,
    TAG_NODE_TYPE,
    TAG_PARENT,
    TAG_PHOTOS,
    TAG_RESUMED_FROM,
    TAG_RUN_NAME,
    TAG_STAGE,
    TAG_SUBJECT,
    TAG_SUBJECT_STATUS,
    TAG_TASK_NAME,
    TRAINED,
    child_runs,
    earlier_attempt,
    find_batch_run,
    runs_still_open,
)
from dreambooth.tracking.spool import MetricSpool, discard, send_pending
from dreambooth.tracking.store import client

log = logging.getLogger(__name__)

# The settings people compare runs by: a param of every run, stage runs included.
HEADLINE_SETTINGS = ("model.base", "training.method", "training.max_steps", "training.learning_rate",
                     "training.prior_loss_weight", "priors.num_class_images", "model.resolution")
SPOOL_FOLDER = "tracking-spool"
DEFAULT_WAIT_SECONDS = 600.0  # at a stage's end, for a tracking server that is away (tracking.outage_tolerance)


def headline_params(config: RunConfig) -> dict[str, str]:
    flat = config.flat_params()
    return {key: flat[key] for key in HEADLINE_SETTINGS}


def record_failure(tracking_uri: str, run_id: str, stage: str, message: str) -> None:
    """A subject that failed: the reason and stage on its run; the run itself is closed by the summary."""
    from mlflow.entities import RunTag

    tags = {TAG_ERROR: message[:5000], TAG_FAILED_STAGE: stage, TAG_SUBJECT_STATUS: FAILED}
    client(tracking_uri).log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def close_subject_run(tracking_uri: str, run) -> str:
    """FINISHED with status `trained` unless a stage failed, with what its stages cost summed; returns the
    subject's status."""
    from dreambooth.tracking.cost import summed

    mlflow = client(tracking_uri)
    log_metrics(mlflow, run.info.run_id, summed(child_runs(tracking_uri, run)))
    status = run.data.tags.get(TAG_SUBJECT_STATUS)
    if status != FAILED and TAG_MODEL_LOCATION not in run.data.tags:
        record_failure(tracking_uri, run.info.run_id, FINE_TUNE.name, "the pipeline ended before the model was saved")
        status = FAILED
    elif status != FAILED:
        mlflow.set_tag(run.info.run_id, TAG_SUBJECT_STATUS, TRAINED)
        status = TRAINED
    mlflow.set_terminated(run.info.run_id, "FINISHED" if status == TRAINED else "FAILED")
    return status


def log_metrics(mlflow, run_id: str, values: dict[str, float]) -> None:
    """Summary figures (step 0) on a run, in one request."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlflow.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in values.items()])


def default_spool_dir() -> Path:
    from dreambooth.models.cache import default_cache_dir

    return default_cache_dir() / "work" / SPOOL_FOLDER


@dataclass
class StageRun:
    """A stage's run. Step metrics go through a journal on local disk (tracking.spool), so training
    never waits on the server; `on_parent` also logs to the parent run."""

    client: object
    run_id: str
    parent_run_id: str
    tracking_uri: str
    spool_dir: Path = field(default_factory=default_spool_dir)
    wait_seconds: float = DEFAULT_WAIT_SECONDS
    progress: Optional[StageProgress] = None  # the stage's progress lines (stdout: the pod's log, `run`'s view)
    _spool: Optional[MetricSpool] = None

    def report(self, done: int, total: int, unit: str, detail: str = "", metrics: Optional[dict[str, float]] = None) -> None:
        """How far the stage is: a progress line, and the fraction as the run's `progress` curve
        (with the step's other `metrics`, in one journal line)."""
        if self.progress is not None:
            self.progress.update(done, total, unit, detail)
        self.log_step_metrics(done, {**(metrics or {}), "progress": done / max(total, 1)})

    def training_log(self, total_steps: int):
        """The training loop's on_log: the step's losses as the run's curves, and a progress line."""

        def on_log(step: int, values: dict[str, float]) -> None:
            self.report(step, total_steps, "steps", f"loss {values['loss']:.4f}" if "loss" in values else "", metrics=values)

        return on_log

    def log_step_metrics(self, step: int, values: dict[str, float]) -> None:
        if self._spool is None:
            self._spool = MetricSpool(self.client, self.tracking_uri, self.run_id, self.spool_dir)
        self._spool.add(step, values)

    def flush(self) -> None:
        """Wait (at most wait_seconds) until every step metric is in MLflow; TrackingUnavailable if not."""
        spool, self._spool = self._spool, None
        if spool is None:
            return
        left = spool.close(self.wait_seconds)
        if left:
            raise TrackingUnavailable(
                f"tracking at {self.tracking_uri} unreachable for {self.wait_seconds:.0f} s ({spool.last_error}); "
                f"{left} step metrics kept in {spool.journal}: send them with `dreambooth sync-tracking`"
            )

    def continue_from(self, earlier_run_id: str, up_to_step: int) -> None:
        """This run resumed a checkpoint `earlier_run_id` wrote (a run of an earlier, killed job):
        link the two, copy its step metrics up to the checkpoint so this run's curves are whole,
        and close it KILLED if nothing else did."""
        from mlflow.entities import Metric

        if not earlier_run_id or earlier_run_id == self.run_id:
            return
        send_pending(self.client, earlier_run_id, self.spool_dir)  # what it logged but never sent
        discard(self.spool_dir, earlier_run_id)
        earlier = self.client.get_run(earlier_run_id)
        points = [
            Metric(key, point.value, point.timestamp, point.step)
            for key in earlier.data.metrics
            for point in self.client.get_metric_history(earlier_run_id, key)
            if 0 < point.step <= up_to_step
        ]
        for start in range(0, len(points), 1000):
            self.client.log_batch(self.run_id, metrics=points[start : start + 1000])
        self.set_tags({TAG_RESUMED_FROM: f"{earlier_run_id} at step {up_to_step}"})
        if earlier.info.status == "RUNNING":
            self.client.set_tag(earlier_run_id, TAG_ERROR, f"interrupted; run {self.run_id} resumed its checkpoint at step {up_to_step}")
            self.client.set_terminated(earlier_run_id, "KILLED")

    def log_metrics(self, values: dict[str, float], on_parent: bool = False) -> None:
        log_metrics(self.client, self.run_id, values)
        if on_parent:
            log_metrics(self.client, self.parent_run_id, values)

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

    def log_folder(self, folder: Path, artifact_path: str, on_parent: bool = False) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        if on_parent:
            self.client.log_artifacts(self.parent_run_id, str(folder), artifact_path)


@contextmanager
def stage_run(
    tracking_uri: str, parent_run_id: str, stage: Stage, tags: Optional[dict] = None,
    spool_dir: Optional[Path] = None, wait_seconds: float = DEFAULT_WAIT_SECONDS,
    params: Optional[dict[str, str]] = None, system_metrics_seconds: float = 0.0, prices: Optional[dict[str, float]] = None,
) -> Iterator[StageRun]:
    """Open a stage's run under its subject (or batch) run, or reopen the one an earlier attempt of
    the task left, so a retry continues its curves. A failure is recorded on both runs and re-raised;
    a preempted stage is closed KILLED and its subject left to the retry. The run gets `params`,
    the subject's photos as its input dataset, system metrics while it runs, and what it cost (its
    accelerator-seconds, node type and, from `prices`, an estimate; a retry adds to the earlier attempt's)."""
    from dreambooth.tracking.cost import stage_cost
    from dreambooth.tracking.system import system_metrics

    mlflow = client(tracking_uri)
    parent = mlflow.get_run(parent_run_id)
    earlier = earlier_attempt(mlflow, parent, stage.name, tags or {})
    if earlier is not None:
        run_id = earlier.info.run_id
        attempt = int(earlier.data.tags.get(TAG_ATTEMPT, "1")) + 1
        mlflow.update_run(run_id, status="RUNNING")
        mlflow.set_tag(run_id, TAG_ATTEMPT, str(attempt))
        log.info("%s: attempt %d continues MLflow run %s", stage.name, attempt, run_id)
    else:
        run_tags = {key: parent.data.tags[key] for key in INHERITED_TAGS if key in parent.data.tags}
        run_tags.update({TAG_PARENT: parent_run_id, TAG_STAGE: stage.name, TAG_TASK_NAME: stage.name, TAG_RUN_NAME: stage.run_name(), **(tags or {})})
        run_id = mlflow.create_run(parent.info.experiment_id, tags=run_tags).info.run_id
        _log_headline(mlflow, run_id, params or {}, parent.data.tags.get(TAG_PHOTOS))
    scope = parent.data.tags.get(TAG_SUBJECT) or f"class:{(tags or {}).get(TAG_CLASS_NOUN, 'batch')}"
    progress = StageProgress(scope, stage.name)
    progress.state(STAGE_RUNNING)
    run = StageRun(mlflow, run_id, parent_run_id, tracking_uri, spool_dir or default_spool_dir(), wait_seconds, progress)
    started = time.monotonic()

    def record_cost() -> None:
        node, metrics = stage_cost(time.monotonic() - started, prices or {}, earlier.data.metrics if earlier else None)
        run.log_metrics(metrics)
        run.set_tags({TAG_NODE_TYPE: node})

    try:
        with system_metrics(tracking_uri, run_id, system_metrics_seconds, resume=earlier is not None):
            yield run
        run.flush()
    except TrackingUnavailable as error:
        progress.state(STAGE_FAILED, str(error).splitlines()[0])
        raise  # any further call would wait on the server again; the message says what is kept where
    except BaseException as error:
        message = (str(error).splitlines() or [type(error).__name__])[0][:5000]
        progress.state(STAGE_FAILED, message)
        try:
            run.flush()
        except TrackingUnavailable as unsent:
            log.warning("%s", unsent)
            raise error from None
        run.set_tags({TAG_ERROR: message})
        record_cost()  # the time was spent all the same
        if isinstance(error, Preempted):
            mlflow.set_terminated(run.run_id, "KILLED")  # the retry reopens this run and resumes the checkpoint
        else:
            mlflow.set_terminated(run.run_id, "FAILED")
            if parent.data.tags.get(TAG_STAGE) == STAGE_SUBJECT:
                record_failure(tracking_uri, parent_run_id, stage.name, message)
        raise
    record_cost()
    mlflow.set_terminated(run.run_id, "FINISHED")
    progress.state(DONE)


def _log_headline(mlflow, run_id: str, params: dict[str, str], photos: Optional[str]) -> None:
    from mlflow.entities import Param

    if params:
        mlflow.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
    if photos:
        log_photos_input(mlflow, run_id, photos)


def photos_dataset(name: str, source: str, digest: str, count: int) -> str:
    """The subject's photos as an MLflow dataset, in the JSON a subject run's TAG_PHOTOS holds."""
    import json

    source_type = "gcs" if source.startswith("gs://") else "local"
    return json.dumps({"name": name, "digest": digest, "source_type": source_type, "source": json.dumps({"uri": source}),
                       "profile": json.dumps({"images": count})})


def log_photos_input(mlflow, run_id: str, photos: str) -> None:
    """The photos as the run's input dataset (MLflow's Datasets column): runs on the same photos share the digest."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(**json.loads(photos))
    mlflow.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def close_batch_run_of_job(tracking_uri: str, experiment: str, job_id: str, pipeline_state: str, reason: str = "") -> Optional[str]:
    """close_batch_run for the job's batch run; its id, or None when the job never opened one."""
    batch = find_batch_run(tracking_uri, experiment, job_id)
    return None if batch is None else close_batch_run(tracking_uri, experiment, batch, pipeline_state, reason)


def close_batch_run(tracking_uri: str, experiment: str, batch, pipeline_state: str, reason: str = "") -> str:
    """Exit handler: close the batch run with the pipeline's final state, and every run of its job
    still open with the reason: a subject as FAILED, a stage that crashed or was killed as KILLED.
    Returns the batch run's id."""
    mlflow = client(tracking_uri)
    succeeded = pipeline_state.upper() in ("SUCCEEDED", "SUCCESS")
    stopped = pipeline_state.upper() == "KILLED"  # a local run stopped by Ctrl-C or SIGTERM
    still_running = runs_still_open(tracking_uri, experiment, batch.data.tags[TAG_JOB_ID])
    for run in still_running:
        if run.info.run_id == batch.info.run_id:
            continue
        if run.data.tags.get(TAG_STAGE) == STAGE_SUBJECT:
            if run.data.tags.get(TAG_SUBJECT_STATUS) != FAILED:
                record_failure(tracking_uri, run.info.run_id, "pipeline", f"the pipeline ended ({pipeline_state}) before this subject finished")
            mlflow.set_terminated(run.info.run_id, "KILLED" if stopped else "FAILED")
        else:  # its pod was killed or crashed: nothing will close it
            mlflow.set_tag(run.info.run_id, TAG_ERROR, f"the pipeline ended ({pipeline_state}) while this stage ran")
            mlflow.set_terminated(run.info.run_id, "KILLED")
    if reason and not succeeded:
        mlflow.set_tag(batch.info.run_id, TAG_ERROR, reason[:5000])
    mlflow.set_terminated(batch.info.run_id, "FINISHED" if succeeded else "KILLED" if stopped else "FAILED")
    return batch.info.run_id

