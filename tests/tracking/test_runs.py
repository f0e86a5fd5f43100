"""The MLflow run layout (batch -> subject -> stage), against a real `mlflow server` process."""

import pytest
from mlflow.tracking import MlflowClient

from dreambooth.stages import FINE_TUNE, INGEST
from dreambooth.tracking import (
    TAG_ERROR,
    TAG_FAILED_STAGE,
    TAG_IDENTIFIER,
    TAG_JOB_ID,
    TAG_MODEL_LOCATION,
    TAG_PARENT,
    TAG_STAGE,
    TAG_SUBJECT_STATUS,
    close_subject_run,
    experiment_id,
    find_batch_run,
    close_batch_run_of_job,
    open_batch_run,
    open_subject_run,
    resolve_tracking_uri,
    stage_run,
    trained_run_finder,
)


def test_stages_log_under_their_subject_and_subjects_under_the_batch(mlflow_server, make_config):
    config = make_config(tracking={"experiment": "layout"})
    batch_id = open_batch_run(mlflow_server, config, "job-1", "dreambooth-job-1")
    assert open_batch_run(mlflow_server, config, "job-1", "dreambooth-job-1") == batch_id  # a retried plan finds it
    subject_id = open_subject_run(mlflow_server, batch_id, config, "fingerprint-1")
    assert open_subject_run(mlflow_server, batch_id, config, "fingerprint-1") == subject_id
    with stage_run(mlflow_server, subject_id, INGEST) as ingest:
        ingest.set_tags({TAG_IDENTIFIER: "fqs"}, on_parent=True)
    with stage_run(mlflow_server, subject_id, FINE_TUNE) as training:
        for step in range(1, 151):
            training.log_step_metrics(step, {"loss": 1.0 / step})
        training.set_tags({TAG_MODEL_LOCATION: "/models/dog"}, on_parent=True)

    client = MlflowClient(mlflow_server)
    fine_tune = client.get_run(training.run_id)
    assert fine_tune.data.tags[TAG_IDENTIFIER] == "fqs"  # set on the subject by ingest, inherited by later stages
    assert fine_tune.data.tags[TAG_JOB_ID] == "job-1" and fine_tune.data.tags[TAG_PARENT] == subject_id
    assert len(client.get_metric_history(training.run_id, "loss")) == 150
    assert client.get_run(subject_id).data.params["training.learning_rate"] == "0.0001"

    trained = trained_run_finder(mlflow_server, "layout")
    assert trained("fingerprint-1") is None  # not finished yet
    assert close_subject_run(mlflow_server, client.get_run(subject_id)) == "trained"
    assert close_batch_run_of_job(mlflow_server, "layout", "job-1", "SUCCEEDED") == batch_id
    assert find_batch_run(mlflow_server, "layout", "job-1").info.status == "FINISHED"
    assert trained("fingerprint-1") == subject_id
    assert trained("fingerprint-2") is None


def test_a_failing_stage_fails_its_subject_with_the_reason(mlflow_server, make_config):
    config = make_config(tracking={"experiment": "failures"})
    batch_id = open_batch_run(mlflow_server, config, "job-2", "dreambooth-job-2")
    subject_id = open_subject_run(mlflow_server, batch_id, config, "fingerprint-3")
    with pytest.raises(ValueError):
        with stage_run(mlflow_server, subject_id, FINE_TUNE):
            raise ValueError("loss exploded\nsecond line")
    client = MlflowClient(mlflow_server)
    subject = client.get_run(subject_id)
    assert subject.data.tags[TAG_ERROR] == "loss exploded" and subject.data.tags[TAG_FAILED_STAGE] == "fine-tune"
    assert close_subject_run(mlflow_server, subject) == "failed"
    assert client.get_run(subject_id).info.status == "FAILED"
    assert trained_run_finder(mlflow_server, "failures")("fingerprint-3") is None  # a failed subject trains again


def test_the_exit_handler_closes_runs_a_crashed_stage_left_open(mlflow_server, make_config):
    config = make_config(tracking={"experiment": "crashed"})
    batch_id = open_batch_run(mlflow_server, config, "job-3", "dreambooth-job-3")
    subject_id = open_subject_run(mlflow_server, batch_id, config, "fingerprint-4")
    client = MlflowClient(mlflow_server)
    stage = client.create_run(client.get_run(subject_id).info.experiment_id,
                              tags={TAG_PARENT: subject_id, TAG_STAGE: "fine-tune", TAG_JOB_ID: "job-3"})  # as a killed pod leaves it
    close_batch_run_of_job(mlflow_server, "crashed", "job-3", "FAILED")
    assert client.get_run(stage.info.run_id).info.status == "KILLED"
    assert "while this stage ran" in client.get_run(stage.info.run_id).data.tags[TAG_ERROR]
    subject = client.get_run(subject_id)
    assert subject.info.status == "FAILED" and subject.data.tags[TAG_SUBJECT_STATUS] == "failed"
    assert client.get_run(batch_id).info.status == "FAILED"


def test_the_tracking_uri_defaults_to_a_local_sqlite_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri() == "http://mlflow:5000"
    assert resolve_tracking_uri("http://other:5000") == "http://other:5000"


FIRST_USE = """
import sys
from dreambooth.tracking import experiment_id
print(experiment_id(sys.argv[1], "dreambooth"))
"""


@pytest.mark.slow
def test_runs_started_together_on_a_fresh_local_store_share_it(tmp_path):
    import subprocess
    import sys

    # Without the lock, three processes lost MLflow's schema race on every try.
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    processes = [subprocess.Popen([sys.executable, "-c", FIRST_USE, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    outcomes = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], [err[-2000:] for _, err in outcomes]
    assert len({out.strip() for out, _ in outcomes}) == 1


def test_a_local_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    experiment = experiment_id(uri, "beside")
    client = MlflowClient(uri)
    run = client.create_run(experiment)
    (tmp_path / "note.txt").write_text("kept")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert list((tmp_path / "store" / "mlflow-artifacts" / "beside").rglob("note.txt"))
    assert not (tmp_path / "mlruns").exists()
