"""`forget --subject ID`: after a real batch (kfp.local, results in the GCS emulator, MLflow in sqlite),
nothing on disk, in the bucket or in the tracking database holds the subject's id or its photos' digests;
the other subject is intact; and a later batch from the same subjects file does not train it again."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli, quick_config
from dreambooth.models.cache import default_cache_dir

FORGOTTEN, KEPT = "rex-4417", "pack-2093"
PHOTOS = {FORGOTTEN: REPO / "examples" / "subjects" / "dog", KEPT: REPO / "examples" / "subjects" / "backpack"}


def _traces_of(subject: str, photos: Path, dataset_digest: str) -> re.Pattern:
    """The subject's id (as a whole name) and every digest of its photos the pipeline could have recorded."""
    digests = [dataset_digest]
    for photo in sorted(photos.iterdir()):
        data = photo.read_bytes()
        digests += [hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()]
    return re.compile("|".join([rf"(?<![A-Za-z0-9_-]){re.escape(subject)}(?![A-Za-z0-9_-])", *digests]))


def _found(pattern: re.Pattern, root: Path, database: Path, bucket: str) -> list[str]:
    """Every file under root (the user's own photos and subjects file aside), every object in the bucket and every row of
    the tracking database where the pattern occurs."""
    from google.cloud import storage

    users_own = {root / "subjects.yaml", database}  # the team's subjects file still lists it: the schedule's input
    found = [str(path) for path in root.rglob("*") if path.is_file() and "photos" not in path.relative_to(root).parts
             and path not in users_own and pattern.search(path.read_bytes().decode("latin-1"))]
    found += [f"gs://{bucket}/{blob.name}" for blob in storage.Client().list_blobs(bucket)
              if pattern.search(blob.download_as_bytes().decode("latin-1"))]
    with sqlite3.connect(database) as connection:
        found += [f"row: {row[:160]}" for row in connection.iterdump() if pattern.search(row)]
    found += [f"{database} (bytes)" for _ in [1] if pattern.search(database.read_bytes().decode("latin-1"))]
    work = default_cache_dir() / "work"  # with a gs:// output, checkpoints and journals stay on local disk here
    found += [str(path) for path in work.rglob("*") if path.is_file() and pattern.search(path.read_bytes().decode("latin-1"))]
    return found


@pytest.mark.slow(seconds=150)
def test_forget_leaves_no_trace_of_the_subject_and_the_schedule_skips_it(tmp_path, gcs_emulator):
    from mlflow.tracking import MlflowClient

    from dreambooth.tracking import TAG_PHOTOS, TAG_STAGE, TAG_SUBJECT

    entries = []
    for subject, source in PHOTOS.items():
        shutil.copytree(source, tmp_path / "photos" / subject)
        entries.append({"id": subject, "photos": f"photos/{subject}", "class_noun": "dog" if "rex" in subject else "backpack"})
    subjects = tmp_path / "subjects.yaml"
    subjects.write_text(yaml.safe_dump({"subjects": entries}))
    config, database = quick_config(tmp_path, superres=False), tmp_path / "mlflow.db"
    tracking, output = f"sqlite:///{database}", f"gs://{gcs_emulator}/forget"
    run = ("run", "--config", config, "--subjects", str(subjects), "--output-dir", output, "--tracking-uri", tracking)
    first = cli(*run, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    mlflow = MlflowClient(tracking)
    (subject_run,) = mlflow.search_runs([mlflow.get_experiment_by_name("dreambooth").experiment_id],
                                        f"tags.`{TAG_SUBJECT}` = '{FORGOTTEN}' and tags.`{TAG_STAGE}` = 'subject'")
    traces = _traces_of(FORGOTTEN, PHOTOS[FORGOTTEN], json.loads(subject_run.data.tags[TAG_PHOTOS])["digest"])
    assert len(_found(traces, tmp_path, database, gcs_emulator)) > 20  # the search finds what a batch leaves

    # From another folder and without --output-dir: the runs say where the batch wrote (the bucket, the work folder).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    forget = ("forget", "--config", config, "--subject", FORGOTTEN, "--tracking-uri", tracking)
    asked = cli(*forget, cwd=elsewhere)  # not a terminal, no --yes: says what would go, removes nothing
    assert asked.returncode == 1 and "nothing removed: pass --yes" in asked.stdout
    assert asked.stdout.startswith(f"{FORGOTTEN}: 5 MLflow runs; 1 logged models; 1 registered model versions;")
    assert f"files under gs://{gcs_emulator}/forget" in asked.stdout.splitlines()[0]
    done = cli(*forget, "--yes", cwd=elsewhere)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{FORGOTTEN}: forgotten" in done.stdout
    assert _found(traces, tmp_path, database, gcs_emulator) == []
    from google.cloud import storage

    (logs,) = [blob.name.rsplit("/", 1)[0] for blob in storage.Client().list_blobs(gcs_emulator, prefix="forget/")
               if blob.name.endswith("/logs/_COMPLETE.json")]
    listed = json.loads(storage.Client().bucket(gcs_emulator).blob(f"{logs}/_COMPLETE.json").download_as_bytes())["files"]
    stored = {blob.name.removeprefix(f"{logs}/") for blob in storage.Client().list_blobs(gcs_emulator, prefix=f"{logs}/")}
    assert f"{KEPT}/fine-tune.log" in listed and set(listed) <= stored  # the published logs' manifest lists what is there

    # The other subject: its model, its registered version, its row in the batch's summary.
    kept = _traces_of(KEPT, PHOTOS[KEPT], "none")
    assert len(_found(kept, tmp_path, database, gcs_emulator)) > 20
    assert [v.version for v in mlflow.search_model_versions(f"name = 'dreambooth-{KEPT}'")] == [1]
    listed = cli("models", "--tracking-uri", tracking, cwd=tmp_path)
    assert f"dreambooth-{KEPT}" in listed.stdout and FORGOTTEN not in listed.stdout

    # Tonight's batch from the same file: the forgotten subject is skipped, the other is up to date.
    again = cli(*run, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "batch:        1 subjects: 0 trained, 1 up to date, 0 failed" in again.stdout
    assert _found(traces, tmp_path, database, gcs_emulator) == []


def test_what_the_runs_recorded_but_is_out_of_reach_is_listed_and_forget_exits_1(tmp_path):
    """A batch that ran on another machine: its job folder is not here. The runs still go; the folder is named."""
    from mlflow.tracking import MlflowClient

    from dreambooth.tracking import STAGE_BATCH, STAGE_SUBJECT, TAG_JOB_NAME, TAG_OUTPUTS, TAG_PARENT, TAG_STAGE, TAG_SUBJECT

    from dreambooth.catalogue.planning import PLAN_ARTIFACT, BatchPlan, PlannedSubject
    from dreambooth.tracking import experiment_id

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(tracking)
    experiment = experiment_id(tracking, "dreambooth")
    elsewhere = "/srv/another-machine/outputs/kfp/dreambooth-job-1"
    batch = mlflow.create_run(experiment, tags={TAG_STAGE: STAGE_BATCH, TAG_JOB_NAME: "dreambooth-job-1", TAG_OUTPUTS: elsewhere})
    subject = mlflow.create_run(experiment, tags={TAG_STAGE: STAGE_SUBJECT, TAG_SUBJECT: "rex", TAG_PARENT: batch.info.run_id})
    planned = PlannedSubject("rex", "dog", "/srv/photos/rex", "{}", "fp", "", subject_run_id=subject.info.run_id)
    mlflow.log_text(batch.info.run_id, BatchPlan(batch.info.run_id, [planned]).to_json(), PLAN_ARTIFACT)
    for run in (subject, batch):
        mlflow.set_terminated(run.info.run_id)
    result = cli("forget", "--config", "tiny", "--subject", "rex", "--tracking-uri", tracking, "--yes", cwd=tmp_path)
    assert result.returncode == 1
    assert "  out of reach: /srv/another-machine/outputs/kfp (recorded by its runs; not on this machine)" in result.stdout
    assert result.stderr == "error: not removed, out of reach from here: /srv/another-machine/outputs/kfp (recorded by its runs; not on this machine)\n"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="not found"):  # what was here went: the run, erased from the store
        mlflow.get_run(subject.info.run_id)
