"""`dreambooth forget --subject ID`: remove what the pipeline kept of a subject's photos and everything
made from them (the DreamBooth paper's ethics section; a person's right to erasure).

The subject's MLflow runs (tag dreambooth.subject) lead to the rest:
- the runs themselves (subject and stage runs: params, metrics, tags, artifacts, input datasets), their
  logged models and registered versions (a registered model left without versions goes too), erased from
  the tracking database with `mlflow gc` (a remote server's database is out of reach: the command to run
  there is printed);
- files wherever its runs recorded writing them (each batch's job folder, local or its published gs:// copy;
  a cluster's pipeline root; the work folder of its checkpoints) and under --output-dir when given: its
  kfp.local task folders and task logs, its published folders, its checkpoints, validation images and
  tracking journal; a place out of reach from here is listed, and the command exits 1;
- what a batch shares with other subjects (the plan, the summary, the copy of the subjects file, the batch
  tasks' logs): its entry is removed, the summary is written again without it, and its id and photo
  digests are replaced by `[forgotten]` wherever else they stand.
Class priors are drawn per class and shared, so they stay (their settings name no subject). A tombstone,
an experiment tag keyed by a digest of the id (the id itself is not kept), makes later batches skip the
subject while a subjects file still lists it.
"""

from __future__ import annotations

import datetime
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dreambooth.catalogue.forgotten import redact, tombstone_key, without_subject_entry
from dreambooth.config import RunConfig
from dreambooth.errors import InputError
from dreambooth.storage import COMPLETE_MARKER, delete_file, is_gcs, list_files, read_bytes, write_bytes
from dreambooth.tracking import (
    SPOOL_FOLDER,
    STAGE_BATCH,
    TAG_ERROR,
    TAG_JOB_NAME,
    TAG_MODEL_LOCATION,
    TAG_OUTPUTS,
    TAG_PARENT,
    TAG_PHOTOS,
    TAG_STAGE,
    client,
    runs_of_subject,
    stage_runs,
)
from dreambooth.tracking.store import erase_deleted_runs

MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".png", ".jpg", ".jpeg", ".pt", ".ckpt", ".model")
TOKENIZER_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
TEXT_LIMIT = 4 * 1024 * 1024  # larger files are weights or images, never a record that names a subject



@dataclass
class Traces:
    """What is known of the subject before anything goes."""

    subject_id: str
    runs: list = field(default_factory=list)  # its subject and stage runs
    secrets: list[str] = field(default_factory=list)  # its id and its photos' digests
    model_locations: list[str] = field(default_factory=list)
    checkpoint_dirs: list[str] = field(default_factory=list)
    logged_models: list[str] = field(default_factory=list)
    versions: list[tuple[str, str]] = field(default_factory=list)  # (registered model, version)


def find_traces(tracking_uri: str, experiment_id: str, subject_id: str) -> Traces:
    mlflow = client(tracking_uri)
    traces = Traces(subject_id, secrets=[subject_id])
    traces.runs = runs_of_subject(tracking_uri, experiment_id, subject_id)
    with tempfile.TemporaryDirectory() as scratch:
        for run in traces.runs:
            tags = run.data.tags
            if TAG_PHOTOS in tags:
                traces.secrets.append(json.loads(tags[TAG_PHOTOS])["digest"])
            if TAG_MODEL_LOCATION in tags:
                traces.model_locations.append(tags[TAG_MODEL_LOCATION])
            stage = tags.get(TAG_STAGE)
            if stage in ("ingest", "fine-tune"):
                name = "manifest.json" if stage == "ingest" else "finetune_result.json"
                try:
                    record = json.loads(Path(mlflow.download_artifacts(run.info.run_id, name, scratch)).read_text())
                except Exception:  # the stage failed before writing it
                    continue
                if stage == "ingest":
                    traces.secrets += [image["sha256"] for image in record.get("images", []) if image.get("sha256")]
                elif record.get("checkpoints"):
                    traces.checkpoint_dirs.append(record["checkpoints"])
            traces.logged_models += [model.model_id for model in mlflow.search_logged_models(
                [experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")]
            traces.versions += [(version.name, version.version) for version in
                                mlflow.search_model_versions(f"run_id = '{run.info.run_id}'")]
    traces.secrets = list(dict.fromkeys(traces.secrets))
    return traces


@dataclass
class Erasure:
    """What forget removed, redacted and left, as lines to print."""

    removed: list[str] = field(default_factory=list)
    redacted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # where the runs wrote, out of reach from here


def forget_subject(subject_id: str, config: RunConfig, output_dir: Optional[str], tracking_uri: str, erase: bool) -> Erasure:
    """Find everything of the subject, wherever its runs recorded that they wrote (and under output_dir, when
    given); with `erase`, remove it (else only say what would go). What cannot be reached is listed."""
    mlflow = client(tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        raise InputError(f"--tracking-uri: no experiment {config.tracking.experiment!r} at {tracking_uri}")
    traces = find_traces(tracking_uri, experiment.experiment_id, subject_id)
    if not traces.runs:
        raise InputError(f"--subject: no runs of {subject_id!r} in experiment {config.tracking.experiment!r} at {tracking_uri}")
    erasure = Erasure()
    batches = _batch_runs_naming(tracking_uri, config.tracking.experiment, traces)
    recorded = _recorded_roots(traces, batches)
    files = {}
    for root in dict.fromkeys(recorded + ([_job_root(output_dir)] if output_dir else []) + [config.storage.work_dir]):
        if root in recorded and not is_gcs(root) and not Path(root).is_dir():
            erasure.unreachable.append(f"{root} (recorded by its runs; not on this machine)")
            continue
        try:
            files[root] = _files_of(root, traces, config.storage.work_dir)
        except Exception as error:  # a bucket out of reach: said, and the rest goes on
            erasure.unreachable.append(f"{root} ({(str(error).splitlines() or [type(error).__name__])[0]})")
    erasure.removed += [f"{len(traces.runs)} MLflow runs", f"{len(traces.logged_models)} logged models",
                        f"{len(traces.versions)} registered model versions"]
    erasure.removed += [f"{len(owned)} files under {root}" for root, (owned, _) in files.items() if owned]
    erasure.redacted += [f"batch run {run.info.run_id}: plan, summary and records" for run in batches]
    erasure.redacted += [f"{len(shared)} shared files under {root}" for root, (_, shared) in files.items() if shared]
    if not erase:
        return erasure

    # The tombstone first: a batch that starts meanwhile already skips the subject. Files go before runs,
    # so a forget cut short finds the runs again and carries on.
    mlflow.set_experiment_tag(experiment.experiment_id, tombstone_key(subject_id),
                              f"forgotten {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    summaries = {run.data.tags.get(TAG_JOB_NAME, ""): _rewrite_batch_run(tracking_uri, run, traces) for run in batches}
    for root, (owned, shared) in files.items():
        for relative in owned:
            delete_file(f"{root}/{relative}")
        for relative in shared:
            _rewrite_file(f"{root}/{relative}", traces, summaries)
        if not is_gcs(root):
            _remove_empty_folders(Path(root))
    for name, version in traces.versions:
        mlflow.delete_model_version(name, version)
        if subject_id in name and not mlflow.search_model_versions(f"name = '{name}'"):
            mlflow.delete_registered_model(name)
    for model_id in traces.logged_models:
        mlflow.delete_logged_model(model_id)
    for run in traces.runs:
        if run.info.lifecycle_stage != "deleted":
            mlflow.delete_run(run.info.run_id)
    erasure.notes += erase_deleted_runs(tracking_uri, [run.info.run_id for run in traces.runs], traces.logged_models,
                                        experiment.experiment_id, traces.secrets)
    return erasure


def _recorded_roots(traces: Traces, batches: list) -> list[str]:
    """Where the subject's files are, as its runs recorded it: each batch's job folder (a local run's, or its
    published gs:// copy: TAG_OUTPUTS), the pipeline root a cluster's fine-tune wrote its model under, and
    the work folder of its checkpoints."""
    roots = []
    jobs = {batch.data.tags.get(TAG_JOB_NAME) for batch in batches} - {None, ""}
    for batch in batches:
        if TAG_OUTPUTS in batch.data.tags:
            roots.append(batch.data.tags[TAG_OUTPUTS].rstrip("/").rsplit("/", 1)[0])
    for location in traces.model_locations:  # a cluster's gs://<pipeline root>/<job>/...; a model `evaluate --model` was given is not ours
        roots += [location.split(f"/{job}/", 1)[0] for job in jobs if is_gcs(location) and f"/{job}/" in location]
    for checkpoints in traces.checkpoint_dirs:
        if "/checkpoints/" in checkpoints:
            roots.append(checkpoints.split("/checkpoints/", 1)[0])
    return roots


def _job_root(output_dir: str) -> str:
    """Where a batch's folders are: kfp.local's pipeline root locally, the published folders on gs://."""
    return output_dir.rstrip("/") if is_gcs(output_dir) else str(Path(output_dir).resolve() / "kfp")


def _batch_runs_naming(tracking_uri: str, experiment: str, traces: Traces) -> list:
    """Every batch run whose plan lists the subject (trained there, or found up to date)."""
    from dreambooth.catalogue.planning import PLAN_ARTIFACT

    mlflow = client(tracking_uri)
    parents = {run.data.tags.get(TAG_PARENT) for run in traces.runs}
    naming = []
    with tempfile.TemporaryDirectory() as scratch:
        for batch in stage_runs(tracking_uri, experiment, STAGE_BATCH):
            if batch.info.run_id in parents:
                naming.append(batch)
                continue
            try:
                plan = Path(mlflow.download_artifacts(batch.info.run_id, PLAN_ARTIFACT, scratch)).read_text()
            except Exception:  # a batch whose plan was never written (its subjects file was refused)
                continue
            if f'"subject_id": "{traces.subject_id}"' in plan:
                naming.append(batch)
    return naming


def _files_of(root: str, traces: Traces, work_dir: str) -> tuple[list[str], list[str]]:
    """(files that are the subject's, shared text files that name it) under root, relative to it."""
    names = list_files(root)
    subject = traces.subject_id
    own_folders = set()
    for name in names:  # kfp.local: the subject loop's iteration folder, where its ingest task wrote (its log says)
        parts = name.split("/")
        if len(parts) > 2 and parts[-3] == "logs" and parts[-2] == subject:
            job = "/".join(parts[:-3])
            text = read_bytes(f"{root}/{name}").decode("utf-8", "replace")
            own_folders |= {f"{job}/{found}/" if job else f"{found}/" for found in re.findall(r"(for-loop-\d+-iteration-\d+)/ingest/", text)}
    for location in traces.model_locations + traces.checkpoint_dirs:
        for folder in _relative_folders(location, root):
            own_folders.add(folder)
    for checkpoints in traces.checkpoint_dirs:  # validation images sit beside, under the same fingerprint
        fingerprint = checkpoints.rstrip("/").rsplit("/", 1)[-1]
        for folder in _relative_folders(f"{work_dir}/validation/{fingerprint}", root):
            own_folders.add(folder)
    run_ids = {run.info.run_id for run in traces.runs}
    owned, shared = [], []
    for name in names:
        parts = name.split("/")
        journal = len(parts) >= 2 and parts[-2] == SPOOL_FOLDER and parts[-1].split(".")[0] in run_ids
        if subject in parts[:-1] or journal or any(name.startswith(folder) for folder in own_folders):
            owned.append(name)
        elif _names_subject(f"{root}/{name}", traces.secrets):
            shared.append(name)
    return owned, shared


def _relative_folders(location: str, root: str) -> list[str]:
    """The kfp.local iteration folder of a model (model -> fine-tune -> iteration), or the folder itself,
    relative to root when it lies under it."""
    local = not is_gcs(location)
    location = str(Path(location).resolve()) if local else location.rstrip("/")
    root = str(Path(root).resolve()) if not is_gcs(root) else root.rstrip("/")
    if not location.startswith(root + "/"):
        return []
    relative = location[len(root) + 1 :]
    parts = relative.split("/")
    iteration = next((i for i, part in enumerate(parts) if re.fullmatch(r"for-loop-\d+-iteration-\d+", part)), None)
    return ["/".join(parts[: iteration + 1]) + "/"] if iteration is not None else [relative + "/"]


def _names_subject(uri: str, secrets: list[str]) -> bool:
    """A record (a log, a plan, a summary) that names the subject; a model's files never are one: a
    tokenizer's vocabulary holds ordinary words that may be an id too."""
    name = uri.rsplit("/", 1)[-1]
    if name.endswith(MODEL_FILE_SUFFIXES) or name in TOKENIZER_FILES or "/tokenizer" in uri:
        return False
    data = read_bytes(uri)
    if len(data) > TEXT_LIMIT or b"\0" in data:
        return False
    text = data.decode("utf-8", "replace")
    return redact(text, secrets) != text


def _rewrite_batch_run(tracking_uri: str, batch, traces: Traces) -> dict[str, str]:
    """The batch run without the subject: its plan, its summary written again, its other records redacted.
    Returns the new summary ({"md": ..., "html": ...}) for the kfp.local copies."""
    from dreambooth.catalogue.planning import PLAN_ARTIFACT, BatchPlan
    from dreambooth.reports.summary import SUMMARY_MARKDOWN, SUMMARY_PAGE, SUMMARY_TABLE, log_summary

    mlflow = client(tracking_uri)
    run_id = batch.info.run_id
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(mlflow.download_artifacts(run_id, "", scratch))
        plan = BatchPlan.from_json((folder / PLAN_ARTIFACT).read_text()).without(traces.subject_id)
        mlflow.log_text(run_id, redact(plan.to_json(), traces.secrets), PLAN_ARTIFACT)
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(batch.info.artifact_uri).delete_artifacts(SUMMARY_TABLE)  # log_table appends to a table
        _, markdown, page = log_summary(tracking_uri, plan, batch.data.tags.get(TAG_JOB_NAME, ""))
        rewritten = {PLAN_ARTIFACT, SUMMARY_MARKDOWN, SUMMARY_PAGE, SUMMARY_TABLE}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(folder).as_posix()
            if relative in rewritten or not _names_subject(str(path), traces.secrets):
                continue
            text = path.read_text()
            if relative.startswith("subjects/"):
                text = without_subject_entry(text, relative, traces.subject_id)
            mlflow.log_text(run_id, redact(text, traces.secrets), relative)
    if TAG_ERROR in batch.data.tags:
        mlflow.set_tag(run_id, TAG_ERROR, redact(batch.data.tags[TAG_ERROR], traces.secrets))
    return {"md": markdown, "html": page}


def _rewrite_file(uri: str, traces: Traces, summaries: dict[str, dict[str, str]]) -> None:
    """A shared file without the subject: a batch's plan and a published folder's manifest lose its entries,
    a summary is the batch run's new one; in anything else the subject's names are replaced."""
    text = read_bytes(uri).decode("utf-8")
    parts = uri.split("/")
    job = next((part for part in parts if part in summaries), None)
    if parts[-2:] == ["summarize", "summary"] and job:
        text = summaries[job]["md"]
    elif parts[-2:] == ["summarize", "summary_page"] and job:
        text = summaries[job]["html"]
    elif parts[-2:] == ["plan-batch", "batch_plan"]:
        from dreambooth.catalogue.planning import BatchPlan

        text = BatchPlan.from_json(text).without(traces.subject_id).to_json()
    elif parts[-1] == COMPLETE_MARKER:  # a published folder's manifest no longer lists the subject's files
        manifest = json.loads(text)
        manifest["files"] = {name: size for name, size in manifest["files"].items() if traces.subject_id not in name.split("/")[:-1]}
        text = json.dumps(manifest)
    write_bytes(uri, redact(text, traces.secrets).encode())


def _remove_empty_folders(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
