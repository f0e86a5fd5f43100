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

from dreambooth.tasks.stages import ingest_task
from dreambooth.tracking import (
    SPOOL_FOLDER,
    TAG_ATTEMPT,
    TAG_ERROR,
    TAG_MODEL_LOCATION,
    TAG_PARENT,
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
from dreambooth.tasks.stages import fine_tune_task
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
            priors={"enabled": False}, tracking={"wait_seconds": 2, "experiment": tmp_path.name},  # the server is shared
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
