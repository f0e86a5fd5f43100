"""The MLflow run layout, against a real `mlflow server` process."""

import pytest
from mlflow.tracking import MlflowClient

from dreambooth.tracking import (
    TAG_ERROR,
    TAG_FAILED_STAGE,
    TAG_IDENTIFIER,
    TAG_JOB_ID,
    TAG_PARENT,
    TAG_STAGE,
    finish_parent_run,
    find_parent_run,
    resolve_tracking_uri,
    stage_run,
)


def test_stages_of_one_job_share_one_parent_run(mlflow_server, make_config):
    config = make_config(tracking={"experiment": "layout"})
    with stage_run(config, mlflow_server, "ingest", "job-1", "dreambooth-job-1", "dog") as ingest:
        ingest.set_tags({TAG_IDENTIFIER: "fqs"}, on_parent=True)
    with stage_run(config, mlflow_server, "fine-tune", "job-1", "dreambooth-job-1", "dog") as training:
        for step in range(1, 151):
            training.log_step_metrics(step, {"loss": 1.0 / step})
    assert finish_parent_run(mlflow_server, "layout", "job-1", "SUCCEEDED") == ingest.parent_run_id

    client = MlflowClient(mlflow_server)
    parent = find_parent_run(mlflow_server, "layout", "job-1")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["training.learning_rate"] == "0.0001"
    children = client.search_runs([parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'")
    assert sorted(run.data.tags[TAG_STAGE] for run in children) == ["fine-tune", "ingest"]
    fine_tune = next(run for run in children if run.data.tags[TAG_STAGE] == "fine-tune")
    assert fine_tune.data.tags[TAG_IDENTIFIER] == "fqs"  # set on the parent by ingest, inherited later
    assert fine_tune.data.tags[TAG_JOB_ID] == "job-1"
    assert len(client.get_metric_history(fine_tune.info.run_id, "loss")) == 150


def test_a_failing_stage_is_recorded_on_its_run_and_the_parent(mlflow_server, make_config):
    config = make_config(tracking={"experiment": "failures"})
    with pytest.raises(ValueError):
        with stage_run(config, mlflow_server, "fine-tune", "job-2", "dreambooth-job-2", "dog"):
            raise ValueError("loss exploded\nsecond line")
    finish_parent_run(mlflow_server, "failures", "job-2", "FAILED")
    parent = find_parent_run(mlflow_server, "failures", "job-2")
    assert parent.info.status == "FAILED"
    assert parent.data.tags[TAG_ERROR] == "loss exploded"
    assert parent.data.tags[TAG_FAILED_STAGE] == "fine-tune"


def test_the_tracking_uri_defaults_to_a_local_sqlite_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri() == "http://mlflow:5000"
    assert resolve_tracking_uri("http://other:5000") == "http://other:5000"
