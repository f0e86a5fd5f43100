"""Faults around the fine-tune: a tracking server that goes away, SIGTERM, SIGKILL. Each runs the real
fine-tune task in its own process against a real `mlflow server` that the test stops and starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dreambooth.tasks.subject import ingest_task
from dreambooth.tracking import (
    SPOOL_FOLDER,
    TAG_ATTEMPT,
    TAG_ERROR,
    TAG_GATE,
    TAG_MODEL_LOCATION,
    TAG_PARENT,
    TAG_REGISTERED,
    TAG_RESUMED_FROM,
    TAG_STAGE,
    TAG_SUBJECT_STATUS,
    open_batch_run,
    open_subject_run,
)
from tests.conftest import REPO, SAMPLE_SUBJECT, MlflowServer, cli

pytestmark = pytest.mark.slow  # each test runs the fine-tune task in processes of its own, a server stopped and started

FINETUNE_TASK = """
import sys
from pathlib import Path
from dreambooth.tasks.subject import fine_tune_task
config_file, tracking_uri, subject_run, subject_dir, output_dir = sys.argv[1:]
fine_tune_task(Path(config_file).read_text(), tracking_uri, subject_run, subject_dir, "", output_dir, "")
"""


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    running = MlflowServer(root, str(root / "artifacts")).start()
    yield running
    running.stop()


@pytest.fixture
def server(module_server):
    """The module's server, up when the test starts (a test stops it; each job has runs of its own)."""
    if module_server.process is None:
        module_server.start()
    return module_server


@pytest.fixture
def job(tmp_path, make_config, server):
    """A subject ready to fine-tune (ingested, no class priors), and a way to start its fine-tune task."""

    def make(job_id: str = "job-1", **training):
        config = make_config(
            priors={"enabled": False}, tracking={"outage_tolerance": 2, "experiment": tmp_path.name},  # the server is shared
            training={"checkpoint_every": 50, "log_every": 1, **training},
        )
        config_file = tmp_path / "config.json"
        config_file.write_text(config.to_json())
        batch = open_batch_run(server.uri, config, job_id, f"dreambooth-{job_id}")
        subject_run = open_subject_run(server.uri, batch, config, "fingerprint")
        subject_dir = tmp_path / "subject"
        if not subject_dir.is_dir():  # a later job trains the folder the first one ingested
            ingest_task(config.to_json(), server.uri, subject_run, str(SAMPLE_SUBJECT), str(subject_dir))
        model = tmp_path / f"model-{job_id}"

        def start() -> subprocess.Popen:
            arguments = [str(config_file), server.uri, subject_run, str(subject_dir), str(model)]
            return subprocess.Popen([sys.executable, "-c", FINETUNE_TASK, *arguments], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        return config, subject_run, model, start

    return make


def _wait_for_step(spool: Path, step: int, task: subprocess.Popen, timeout: float = 180) -> None:
    """Until the task's journal holds `step` (the loop is training and logging)."""
    deadline = time.time() + timeout
    while True:
        steps = [json.loads(line)["step"] for journal in spool.glob("*.jsonl") for line in journal.read_text().splitlines()]
        if max(steps, default=0) >= step:
            return
        assert task.poll() is None, task.communicate()[1][-3000:]
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.1)


def _stage_runs(server: MlflowServer, subject_run: str) -> list:
    client = MlflowClient(server.uri)
    experiment = client.get_run(subject_run).info.experiment_id
    return client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{subject_run}' and tags.`{TAG_STAGE}` = 'fine-tune'")


def _loss_steps(server: MlflowServer, run_id: str) -> list[int]:
    return sorted(point.step for point in MlflowClient(server.uri).get_metric_history(run_id, "loss"))


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_training_outlives_a_tracking_outage_and_its_retry_reuses_the_saved_model(job, server, tmp_path):
    config, subject_run, model, start = job(max_steps=20)
    spool = Path(config.storage.work_dir) / SPOOL_FOLDER
    started = time.time()
    task = start()
    _wait_for_step(spool, 3, task)
    server.stop()  # and not back before the task ends
    _, stderr = task.communicate(timeout=600)
    elapsed = time.time() - started

    # The model is saved, every step is kept on disk, and the stage says so in one line.
    assert task.returncode == 3, stderr[-3000:]
    [error] = _error_lines(stderr)
    assert "unreachable" in error and "sync-tracking" in error and str(spool) in error
    assert (model / "model_index.json").is_file()
    [journal] = spool.glob("*.jsonl")
    kept = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted(point["step"] for point in kept if point["key"] == "loss") == list(range(1, 21))
    # MLflow's own retries alone would hold one call for ~4 min; training did not wait on any.
    assert elapsed < 150, f"the task took {elapsed:.0f} s with tracking away"

    server.start()
    synced = cli("sync-tracking", "--config", str(tmp_path / "config.json"), cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr
    [stage] = _stage_runs(server, subject_run)
    assert _loss_steps(server, stage.info.run_id) == list(range(1, 21))  # each step once
    assert not list(spool.iterdir())

    # KFP's retry: the same MLflow run goes on, and the saved model is recorded instead of retrained.
    retry = start()
    _, stderr = retry.communicate(timeout=600)
    assert retry.returncode == 0, stderr[-3000:]
    [stage] = _stage_runs(server, subject_run)
    assert stage.info.status == "FINISHED" and stage.data.tags[TAG_ATTEMPT] == "2"
    assert stage.data.metrics["resumed_from_step"] == 20  # nothing trained again
    assert _loss_steps(server, stage.info.run_id) == list(range(1, 21))
    assert MlflowClient(server.uri).get_run(subject_run).data.tags[TAG_MODEL_LOCATION] == str(model)
    assert not (Path(config.storage.work_dir) / "checkpoints").exists() or not any((Path(config.storage.work_dir) / "checkpoints").iterdir())


def test_sigterm_checkpoints_and_the_retry_continues_the_same_run(job, server):
    config, subject_run, model, start = job(max_steps=20)
    task = start()
    _wait_for_step(Path(config.storage.work_dir) / SPOOL_FOLDER, 6, task)
    task.send_signal(signal.SIGTERM)
    _, stderr = task.communicate(timeout=300)

    assert task.returncode == 143, stderr[-3000:]
    [error] = _error_lines(stderr)
    stopped = int(error.split("stopped by SIGTERM at step ")[1].split("/")[0])
    assert 6 <= stopped < 20
    assert list((Path(config.storage.work_dir) / "checkpoints").glob(f"*/step-{stopped:06d}/checkpoint-complete"))
    [stage] = _stage_runs(server, subject_run)
    assert stage.info.status == "KILLED" and "SIGTERM" in stage.data.tags[TAG_ERROR]
    assert MlflowClient(server.uri).get_run(subject_run).data.tags[TAG_SUBJECT_STATUS] == "running"  # left to the retry
    assert not model.exists()

    retry = start()
    _, stderr = retry.communicate(timeout=600)
    assert retry.returncode == 0, stderr[-3000:]
    [stage] = _stage_runs(server, subject_run)
    assert stage.info.status == "FINISHED" and stage.data.tags[TAG_ATTEMPT] == "2"
    assert stage.data.metrics["resumed_from_step"] == stopped
    assert _loss_steps(server, stage.info.run_id) == list(range(1, 21))  # the first attempt's steps kept, none twice


def test_a_new_job_resuming_a_killed_jobs_checkpoint_links_its_run_and_closes_the_old_one(job, server):
    config, first_subject, _, start = job("job-1", max_steps=30, checkpoint_every=10)
    task = start()
    _wait_for_step(Path(config.storage.work_dir) / SPOOL_FOLDER, 22, task)
    os.kill(task.pid, signal.SIGKILL)  # no handler runs: the run stays RUNNING
    task.communicate()
    [killed] = _stage_runs(server, first_subject)
    assert killed.info.status == "RUNNING"

    _, second_subject, _, start_again = job("job-2", max_steps=30, checkpoint_every=10)
    rerun = start_again()
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    [resumed] = _stage_runs(server, second_subject)
    assert resumed.data.tags[TAG_RESUMED_FROM] == f"{killed.info.run_id} at step 20"
    assert _loss_steps(server, resumed.info.run_id) == list(range(1, 31))  # steps 1-20 copied from the killed run
    old = MlflowClient(server.uri).get_run(killed.info.run_id)
    assert old.info.status == "KILLED" and resumed.info.run_id in old.data.tags[TAG_ERROR]


def test_a_new_job_reusing_a_model_an_outage_left_unrecorded_carries_its_curve_and_links_its_run(job, server):
    config, first_subject, model, start = job("job-1", max_steps=20)
    task = start()
    _wait_for_step(Path(config.storage.work_dir) / SPOOL_FOLDER, 3, task)
    server.stop()  # past the tolerance: the model is saved, the steps journalled, the stage fails
    _, stderr = task.communicate(timeout=600)
    assert task.returncode == 3, stderr[-3000:]
    server.start()

    # Running the batch again (no sync-tracking in between): a new job, which trains nothing.
    _, second_subject, _, start_again = job("job-2", max_steps=20)
    rerun = start_again()
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    [reused] = _stage_runs(server, second_subject)
    [earlier] = _stage_runs(server, first_subject)
    assert reused.data.metrics["resumed_from_step"] == 20  # the saved model, nothing trained again
    assert reused.data.tags[TAG_RESUMED_FROM] == f"{earlier.info.run_id} at step 20"
    assert _loss_steps(server, reused.info.run_id) == list(range(1, 21))  # the curve the earlier attempt trained
    assert _loss_steps(server, earlier.info.run_id) == list(range(1, 21))  # its journal sent, once
    assert earlier.info.status == "KILLED" and reused.info.run_id in earlier.data.tags[TAG_ERROR]


def _wait_for(found, what: str, task: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while not (hit := found()):
        assert task.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)
    return hit


# MLflow's own client retries a refused call for about a minute (dreambooth.process: 5 retries, backoff 2). Here
# they are cut to one (about 2 s), so an outage of OUTAGE_SECONDS is ten times longer than they cover: riding it
# out is tracking.outage_tolerance's doing, as a 90 s outage is with the default retries.
OUTAGE_SECONDS = 20
MLFLOWS_OWN_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}


@pytest.mark.slow(seconds=200)
def test_a_batch_rides_out_tracking_outages_longer_than_mlflows_retries_in_fine_tune_samples_and_evaluate(tmp_path):
    """tracking.outage_tolerance (600 s): the server is stopped mid-fine-tune, at the start of samples and during
    evaluate, each time for ten times what MLflow's own retries cover, in one local run; it ends with exit 0 and
    every step recorded once."""
    import yaml

    from tests.conftest import quick_config

    server = MlflowServer(tmp_path, str(tmp_path / "artifacts")).start()
    config = Path(quick_config(tmp_path, superres=False, max_steps=60, checkpoint_every=30, log_every=1))
    raw = yaml.safe_load(config.read_text())
    raw["priors"]["enabled"] = False
    config.write_text(yaml.safe_dump(raw))
    subjects = tmp_path / "subjects.yaml"
    subjects.write_text(yaml.safe_dump({"subjects": [{"id": "dog", "photos": str(SAMPLE_SUBJECT), "class_noun": "dog"}]}))
    output = tmp_path / "out"
    log = open(tmp_path / "run.log", "w")
    task = subprocess.Popen([sys.executable, str(REPO / "pipeline.py"), "run", "--config", str(config), "--subjects", str(subjects),
                             "--output-dir", str(output), "--tracking-uri", server.uri], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **MLFLOWS_OWN_RETRIES})
    outages = []

    def outage(seconds: float = OUTAGE_SECONDS) -> None:
        server.stop()
        stopped = time.time()
        time.sleep(seconds)
        server.start()
        outages.append(time.time() - stopped)

    try:  # the server stops with the test whatever happens
        _wait_for_step(output / "work" / SPOOL_FOLDER, 3, task, timeout=300)  # the fine-tune is training
        outage()
        _wait_for(lambda: list(output.glob("kfp/*/logs/dog/samples.log")), "samples task", task)
        outage()
        _wait_for(lambda: list(output.glob("kfp/*/logs/dog/evaluate.log")), "evaluate task", task)
        time.sleep(1)
        outage()
        task.wait(timeout=900)
    finally:
        if task.poll() is None:
            task.kill()
        log.close()
        if task.returncode != 0:
            server.stop()
    text = (tmp_path / "run.log").read_text()
    assert task.returncode == 0, text[-5000:]
    assert len(outages) == 3 and min(outages) >= OUTAGE_SECONDS

    client = MlflowClient(server.uri)
    try:
        experiment = client.get_experiment_by_name("dreambooth").experiment_id
        (subject,) = client.search_runs([experiment], f"tags.`{TAG_STAGE}` = 'subject'")
        assert subject.info.status == "FINISHED" and subject.data.tags[TAG_SUBJECT_STATUS] == "trained"
        stages = client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{subject.info.run_id}'")
        # One run per stage, each finished at its first attempt (none failed and was retried).
        assert sorted(run.data.tags[TAG_STAGE] for run in stages) == ["evaluate", "fine-tune", "ingest", "samples"]
        assert all(run.info.status == "FINISHED" and TAG_ATTEMPT not in run.data.tags for run in stages)
        (fine_tune,) = [run for run in stages if run.data.tags[TAG_STAGE] == "fine-tune"]
        assert _loss_steps(server, fine_tune.info.run_id) == list(range(1, 61))  # every step, once
        (evaluate,) = [run for run in stages if run.data.tags[TAG_STAGE] == "evaluate"]
        assert "eval/dino" in evaluate.data.metrics
        # The tiny config's gate passes any scores: the evaluate stage registered the model, once, through the third outage.
        assert evaluate.data.tags[TAG_GATE] == "passed" and subject.data.tags[TAG_REGISTERED] == "dreambooth-dog@candidate (version 1)"
        assert [version.version for version in client.search_model_versions("name = 'dreambooth-dog'")] == ["1"]
    finally:
        server.stop()
