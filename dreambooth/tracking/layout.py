"""The MLflow run layout, in one place: every tag, run name, parent link and search filter.

    batch run (one per pipeline run, found by its KFP job id; a sharded batch's shards are batch runs under it)
      ├── class-priors runs (one per class-prior group)
      ├── compare runs (`dreambooth compare --batch-run`)
      └── subject run (one per subject trained)
            └── stage runs (ingest, fine-tune, samples, evaluate, super-resolution, ...)

The plan task opens the batch run and the subject runs, so later tasks are handed a subject
run's id instead of searching for it. A subject run carries the subject's fingerprint (photos,
settings, base model) and its outcome, which is how a later batch knows it is up to date.
Every reader and writer of these runs uses the names and searches below; tests/test_structure.py
fails when a tag or a search is written anywhere else. Searches page through every result.
"""

from __future__ import annotations

from typing import Callable, Optional

from dreambooth.config import RunConfig
from dreambooth.tracking.store import client, experiment_id

TAG_JOB_ID = "kfp.job_id"
TAG_JOB_NAME = "kfp.job_name"
TAG_TASK_NAME = "kfp.task_name"
TAG_STAGE = "dreambooth.stage"
TAG_SUBJECT = "dreambooth.subject"
TAG_CLASS_NOUN = "dreambooth.class_noun"
TAG_IDENTIFIER = "dreambooth.identifier"
TAG_FINGERPRINT = "dreambooth.fingerprint"
TAG_CONSENT = "dreambooth.consent"  # who agreed to the subject's photos being trained on, and when
TAG_SAFETY = "dreambooth.safety_check"  # evaluation.safety_checker's verdict on the evaluation's images
TAG_NODE_TYPE = "dreambooth.node_type"  # where a stage ran: a GPU's name (nvidia-l4) or cpu (its cost: tracking.cost)
TAG_WATERMARK = "dreambooth.watermark"  # the payload marked on every image the subject's model draws
TAG_SUBJECT_STATUS = "dreambooth.subject_status"  # running, trained or failed
TAG_ERROR = "dreambooth.error"
TAG_FAILED_STAGE = "dreambooth.failed_stage"
TAG_MODEL_URI = "dreambooth.model_uri"  # the MLflow model (models:/...)
TAG_MODEL_LOCATION = "dreambooth.model_location"  # the diffusers folder the fine-tune wrote (path or gs://)
TAG_OUTPUTS = "dreambooth.outputs"  # a local batch's job folder, or its published gs:// copy (what forget searches)
TAG_GATE = "dreambooth.gate"
TAG_GATE_REASON = "dreambooth.gate_reason"
TAG_REGISTERED = "dreambooth.registered_model"
TAG_REGISTERED_VERSION = "dreambooth.registered_version"
TAG_EVAL_PROTOCOL = "dreambooth.eval_protocol"
TAG_PRIOR_KEY = "dreambooth.prior_key"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_ATTEMPT = "dreambooth.attempt"  # 2 and up: a retried task continued this run
TAG_PICKLE_ALLOWED = "dreambooth.pickle_weights_allowed"  # model.allow_pickle: pickle weights could load
TAG_RESUMED_FROM = "dreambooth.resumed_from"  # "<run id> at step N": the run whose checkpoint this one resumed
TAG_SHARDS = "dreambooth.shards"  # on a batch run split into shards (batch.max_subjects_per_run): how many
TAG_SHARD = "dreambooth.shard"  # on a shard's own batch run: "2/3" (its parent is the batch run that ties them)
TAG_PHOTOS = "dreambooth.photos"  # the subject's photos as an MLflow dataset (JSON), logged as each stage's input
# Set by single stages: what they chose and why.
TAG_IDENTIFIER_REASON = "dreambooth.identifier_reason"
TAG_SELECTED_STEP = "dreambooth.selected_step"  # evaluation.select: the training step whose model was kept
TAG_SELECTION_REASON = "dreambooth.selection_reason"
TAG_EVALUATION = "dreambooth.evaluation"  # "disabled" when evaluation.enabled is false
TAG_SUPERRES_NOISE_LEVELS = "dreambooth.superres_noise_levels"
TAG_SUPERRES_INFERENCE_NOISE_LEVEL = "dreambooth.superres_inference_noise_level"
TAG_CLASS_PROMPT = "dreambooth.class_prompt"
TAG_PRIORS_SOURCE = "dreambooth.priors_source"  # generated, cached or the user's folder
TAG_COMPARED_RUNS = "dreambooth.compared_runs"
TAG_COMPARED_SUBJECTS = "dreambooth.compared_subjects"
# On registered model versions.
TAG_REVIEW_NOTE = "dreambooth.review_note"
TAG_PROMOTED = "dreambooth.promoted"  # "<alias> by <who> at <UTC time>"

INHERITED_TAGS = (TAG_JOB_ID, TAG_JOB_NAME, TAG_SUBJECT, TAG_CLASS_NOUN, TAG_IDENTIFIER)
STAGE_BATCH, STAGE_SUBJECT = "batch", "subject"
RUNNING, TRAINED, FAILED = "running", "trained", "failed"
STAGE_COMPARE = "compare"
PAGE_SIZE = 1000


def _log_params(mlflow, run_id: str, config: RunConfig) -> None:
    from mlflow.entities import Param

    params = [Param(key, value[:6000]) for key, value in config.flat_params().items()]
    for start in range(0, len(params), 100):
        mlflow.log_batch(run_id, params=params[start : start + 100])


def batch_run_name(job_name: str) -> str:
    return f"batch-{job_name}"


def compare_run_name(count: int) -> str:
    return f"compare-{count}-runs"


def search_all(mlflow, experiment_ids: list[str], filter_string: str, order_by: Optional[list[str]] = None,
               view_type: int = 1) -> list:
    """Every run that matches, page after page (one page would silently stop at PAGE_SIZE runs); view_type:
    MLflow's ViewType (active runs only by default)."""
    runs, token = [], None
    while True:
        page = mlflow.search_runs(experiment_ids, filter_string, run_view_type=view_type, order_by=order_by, max_results=PAGE_SIZE,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _search(tracking_uri: str, experiment: str, filter_string: str, newest_first: bool = False) -> list:
    mlflow = client(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    order = ["attributes.start_time DESC"] if newest_first else None
    return search_all(mlflow, [found.experiment_id], filter_string, order)


def find_batch_run(tracking_uri: str, experiment: str, job_id: str = "", job_name: str = ""):
    """The pipeline run's batch run, by KFP job id or job name; None if never opened."""
    key, value = (TAG_JOB_ID, job_id) if job_id else (TAG_JOB_NAME, job_name)
    runs = _search(tracking_uri, experiment, f"tags.`{key}` = '{value}' and tags.`{TAG_STAGE}` = '{STAGE_BATCH}'")
    return runs[0] if runs else None


def open_batch_run(tracking_uri: str, config: RunConfig, job_id: str, job_name: str) -> str:
    """Find or create the job's batch run (a retried plan task finds the one it made)."""
    existing = find_batch_run(tracking_uri, config.tracking.experiment, job_id)
    if existing is not None:
        return existing.info.run_id
    mlflow = client(tracking_uri)
    tags = {TAG_JOB_ID: job_id, TAG_JOB_NAME: job_name, TAG_STAGE: STAGE_BATCH, TAG_RUN_NAME: batch_run_name(job_name)}
    run = mlflow.create_run(experiment_id(tracking_uri, config.tracking.experiment), tags=tags)
    _log_params(mlflow, run.info.run_id, config)
    return run.info.run_id


def subject_runs(tracking_uri: str, batch_run_id: str) -> list:
    mlflow = client(tracking_uri)
    batch = mlflow.get_run(batch_run_id)
    return search_all(mlflow, [batch.info.experiment_id], f"tags.`{TAG_PARENT}` = '{batch_run_id}' and tags.`{TAG_STAGE}` = '{STAGE_SUBJECT}'")


def open_subject_run(tracking_uri: str, batch_run_id: str, config: RunConfig, fingerprint: str) -> str:
    """Find or create the subject's run under the batch run."""
    return subject_run_opener(tracking_uri, batch_run_id)(config, fingerprint)


def subject_run_opener(tracking_uri: str, batch_run_id: str) -> Callable[[RunConfig, str], str]:
    """open_subject_run for many subjects of one batch: the batch's runs are read once (a retried plan task
    finds the runs it opened before), so each subject costs its run's creation and params, nothing more."""
    mlflow = client(tracking_uri)
    batch = mlflow.get_run(batch_run_id)
    opened = {run.data.tags.get(TAG_SUBJECT): run.info.run_id for run in subject_runs(tracking_uri, batch_run_id)}

    def open_run(config: RunConfig, fingerprint: str) -> str:
        if config.subject.name not in opened:
            opened[config.subject.name] = _create_subject_run(mlflow, batch, config, fingerprint)
        return opened[config.subject.name]

    return open_run


def _create_subject_run(mlflow, batch, config: RunConfig, fingerprint: str) -> str:
    subject, batch_run_id = config.subject.name, batch.info.run_id
    tags = {
        **{key: batch.data.tags[key] for key in (TAG_JOB_ID, TAG_JOB_NAME) if key in batch.data.tags},
        TAG_PARENT: batch_run_id,
        TAG_STAGE: STAGE_SUBJECT,
        TAG_SUBJECT: subject,
        TAG_CLASS_NOUN: config.subject.class_noun,
        TAG_FINGERPRINT: fingerprint,
        **({TAG_CONSENT: config.subject.consent.describe()} if config.subject.consent else {}),
        TAG_SUBJECT_STATUS: RUNNING,
        TAG_RUN_NAME: subject,
    }
    run = mlflow.create_run(batch.info.experiment_id, tags=tags)
    _log_params(mlflow, run.info.run_id, config)
    return run.info.run_id


TRAINED_FILTER = f"tags.`{TAG_SUBJECT_STATUS}` = '{TRAINED}' and attributes.status = 'FINISHED'"


def trained_run_finder(tracking_uri: str, experiment: str) -> Callable[[str], Optional[str]]:
    """fingerprint -> the id of the newest finished subject run that trained it, or None: a search per
    subject that returns at most one run, for a few subjects (a shard's) among a catalogue's thousands."""
    mlflow = client(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)

    def trained_run_id(fingerprint: str) -> Optional[str]:
        if found is None:
            return None
        runs = mlflow.search_runs([found.experiment_id], f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}' and {TRAINED_FILTER}",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    return trained_run_id


def trained_subjects(tracking_uri: str, experiment: str) -> dict:
    """{fingerprint: the newest finished subject run whose training succeeded}, newest first, for a whole
    plan in one paged search (one search per subject grows with the catalogue)."""
    found: dict = {}
    for run in _search(tracking_uri, experiment, TRAINED_FILTER, newest_first=True):
        found.setdefault(run.data.tags.get(TAG_FINGERPRINT, ""), run)
    return found


def runs_still_open(tracking_uri: str, experiment: str, job_id: str) -> list:
    """Every run of the job that is still RUNNING (the batch run included)."""
    return _search(tracking_uri, experiment, f"tags.`{TAG_JOB_ID}` = '{job_id}' and attributes.status = 'RUNNING'")


def stage_runs(tracking_uri: str, experiment: str, stage: str) -> list:
    """Every run of one stage (`subject`, `class-priors` ...) in the experiment."""
    return _search(tracking_uri, experiment, f"tags.`{TAG_STAGE}` = '{stage}'")


def child_runs(tracking_uri: str, parent) -> list:
    """Every run directly under `parent` (a subject's stage runs; a batch's subject and class-priors runs)."""
    return search_all(client(tracking_uri), [parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'")


def runs_by_id(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> dict:
    """{run id: run} for many runs in a search per 100 (one get_run each grows with a catalogue); a run
    of another experiment is fetched alone."""
    mlflow = client(tracking_uri)
    found: dict = {}
    for start in range(0, len(run_ids), 100):
        quoted = ", ".join(f"'{run_id}'" for run_id in run_ids[start : start + 100])
        found.update({run.info.run_id: run for run in search_all(mlflow, [experiment_id], f"attributes.run_id IN ({quoted})")})
    found.update({run_id: mlflow.get_run(run_id) for run_id in run_ids if run_id not in found})
    return found


def shard_runs(tracking_uri: str, batch) -> list:
    """The batch runs of a sharded batch's shards (each its own pipeline run), in shard order."""
    found = search_all(client(tracking_uri), [batch.info.experiment_id],
                       f"tags.`{TAG_PARENT}` = '{batch.info.run_id}' and tags.`{TAG_STAGE}` = '{STAGE_BATCH}'")
    return sorted(found, key=lambda run: int(run.data.tags.get(TAG_SHARD, "0/0").split("/")[0]))


def runs_of_subject(tracking_uri: str, experiment_id: str, subject: str) -> list:
    """Every run of one subject (its subject run and stage runs), deleted ones included (a `forget` cut short)."""
    from mlflow.entities import ViewType

    return search_all(client(tracking_uri), [experiment_id], f"tags.`{TAG_SUBJECT}` = '{subject}'", view_type=ViewType.ALL)


def earlier_attempt(mlflow, parent, stage: str, tags: dict) -> Optional[object]:
    """The run an earlier attempt of this task opened (same parent, stage and identifying tags), if any."""
    filters = [f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'", f"tags.`{TAG_STAGE}` = '{stage}'"]
    filters += [f"tags.`{key}` = '{value}'" for key, value in tags.items() if key != TAG_RUN_NAME]
    found = mlflow.search_runs([parent.info.experiment_id], " and ".join(filters), order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None
