"""pipeline.py: the compiled DAG, the command line, and whole local runs through kfp.local."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from mlflow.tracking import MlflowClient

from conftest import REPO, SAMPLE_SUBJECT
from dreambooth.config import RunConfig, load_config
from dreambooth.tracking import TAG_ERROR, TAG_FAILED_STAGE, TAG_GATE, TAG_GATE_REASON, TAG_MODEL_URI, TAG_PARENT, TAG_STAGE

STAGES = ["ingest", "class-priors", "finetune", "samples", "evaluate"]


def _cli(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "pipeline.py"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def _stage_dag(spec: dict) -> dict:
    handler = spec["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]
    return spec["components"][handler]["dag"]["tasks"]


def test_compile_writes_a_pipeline_spec_with_the_four_stages_in_order(tmp_path):
    result = _cli("compile", "--output", str(tmp_path / "dreambooth.yaml"), "--config", "sd15", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec_dict = next(yaml.safe_load_all((tmp_path / "dreambooth.yaml").read_text()))
    json_format.ParseDict(spec_dict, pipeline_spec_pb2.PipelineSpec())  # a valid KFP PipelineSpec

    tasks = _stage_dag(spec_dict)
    condition = tasks.pop("condition-2")
    assert sorted(tasks) == sorted(STAGES)
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--superres_enabled'] == true"
    superres_tasks = spec_dict["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert sorted(superres_tasks) == ["evaluate-upscaled", "superres"]
    assert spec_dict["root"]["inputDefinitions"]["parameters"]["superres_enabled"]["defaultValue"] is True
    assert "dependentTasks" not in tasks["ingest"]
    assert tasks["class-priors"]["dependentTasks"] == ["ingest"]
    assert sorted(tasks["finetune"]["dependentTasks"]) == ["class-priors", "ingest"]
    assert tasks["samples"]["dependentTasks"] == ["finetune"]
    assert sorted(tasks["evaluate"]["dependentTasks"]) == ["finetune", "ingest"]
    assert all(not task["cachingOptions"].get("enableCache") for task in tasks.values())

    closing = spec_dict["root"]["dag"]["tasks"]["finish-tracking"]
    assert closing["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs even when a stage fails
    default_config = spec_dict["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]
    assert RunConfig.from_json(default_config) == load_config("sd15")


def test_ingest_alone_validates_an_upload(tmp_path):
    result = _cli("ingest", "--config", "tiny", "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
                  "--output-dir", str(tmp_path / "checked"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "identifier" in result.stdout
    assert json.loads((tmp_path / "checked" / "manifest.json").read_text())["class_noun"] == "dog"


def test_a_bad_upload_fails_in_one_line_before_any_task_starts(subject_dir, tmp_path):
    (subject_dir / "scan.pdf").write_bytes(b"%PDF-1.4 not an image")
    for command in ("ingest", "run"):
        result = _cli(command, "--config", "tiny", "--subject-dir", str(subject_dir), "--class-noun", "dog",
                      "--output-dir", str(tmp_path / command), cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: {subject_dir / 'scan.pdf'}: not an image Pillow can read"]
    assert not (tmp_path / "run" / "kfp").exists()


def _quick_config(tmp_path, experiment="dreambooth", gate=None, superres=True, **training) -> str:
    """The tiny config, shrunk further so a whole pipeline run takes well under a minute."""
    path = tmp_path / "quick.yaml"
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["priors"]["num_class_images"] = 4
    raw["training"].update({"max_steps": 8, "checkpoint_every": 4, **training})
    raw["tracking"] = {"experiment": experiment}
    raw["superres"].update({"enabled": superres, "training": {"max_steps": 6, "learning_rate": 1.0e-4, "checkpoint_every": 3}})
    raw["evaluation"].update({"max_prompts_per_category": 1, "gate": gate or raw["evaluation"]["gate"]})
    raw["samples"].update({"images_per_prompt": 1, "prompts": ["a {identifier} {class_noun} on the beach"]})
    path.write_text(yaml.safe_dump(raw))
    return str(path)


STAGE_RUNS = ["ingest", "class-priors", "fine-tune", "samples", "evaluate"]
SUPERRES_RUNS = ["super-resolution", "evaluate-upscaled"]


def _check_tracked_run(client, experiment_name="dreambooth", steps=8, stages=tuple(STAGE_RUNS)):
    experiment = client.get_experiment_by_name(experiment_name)
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{TAG_STAGE}` = 'pipeline'")
    children = client.search_runs([experiment.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED"
    assert sorted(run.data.tags[TAG_STAGE] for run in children) == sorted(stages)
    assert all(run.info.status == "FINISHED" for run in children)
    fine_tune = next(run for run in children if run.data.tags[TAG_STAGE] == "fine-tune")
    for curve in ("loss", "instance_loss", "prior_loss", "lr"):
        assert [m.step for m in client.get_metric_history(fine_tune.info.run_id, curve)] == list(range(1, steps + 1))
    assert "train_steps_per_second" in parent.data.metrics
    assert parent.data.params["model.base"] == "tiny://sd"
    assert {"manifest.json", "samples-grid.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    priors = next(run for run in children if run.data.tags[TAG_STAGE] == "class-priors")
    assert "class-priors-preview.png" in {a.path for a in client.list_artifacts(priors.info.run_id)}
    assert parent.data.tags[TAG_MODEL_URI].startswith("models:/")  # the pipeline folder as an MLflow model

    evaluation = next(run for run in children if run.data.tags[TAG_STAGE] == "evaluate")
    for name in ("eval/dino", "eval/clip_i", "eval/clip_t", "eval/div", "eval/pres", "eval/pres_base", "eval/real_images_dino"):
        assert name in evaluation.data.metrics and name in parent.data.metrics
    evaluation_files = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"eval_prompts.json", "evaluation_config.json", "report.md", "eval_grids"} <= evaluation_files
    grids = {a.path for a in client.list_artifacts(evaluation.info.run_id, "eval_grids")}
    assert {"eval_grids/grid-recontextualization.png", "eval_grids/grid-accessorization.png"} <= grids
    return parent


def _check_kfp_outputs(job_dir):
    """The evaluation shows in KFP too: a Metrics output (in the executor metadata) and a Markdown report."""
    executor_output = json.loads((job_dir / "evaluate" / "executor_output.json").read_text())
    metrics = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"dino", "clip_i", "clip_t", "div", "pres"} <= set(metrics)
    assert (job_dir / "evaluate" / "report").read_text().startswith("# DreamBench evaluation")


@pytest.mark.slow
def test_run_on_the_tiny_config_tracks_into_local_sqlite_by_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    strict = {"min_dino": 2.0, "min_clip_t": -1.0, "max_pres": 1.0}  # no model reaches DINO 2: rejected
    result = _cli("run", "--config", _quick_config(tmp_path, gate=strict, superres=False), "--subject-dir", str(SAMPLE_SUBJECT),
                  "--class-noun", "dog", "--output-dir", str(tmp_path / "outputs"), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = dict(line.split(":", 1) for line in result.stdout.splitlines()[-7:] if ":" in line)
    assert "upscaler" not in printed  # superres.enabled: false, so the DAG skipped the stage
    model_dir = printed["model"].strip()

    from diffusers import DiffusionPipeline

    image = DiffusionPipeline.from_pretrained(model_dir)("a dog", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = _check_tracked_run(client)
    assert parent.info.run_id in printed["mlflow run"]
    assert parent.data.tags[TAG_GATE] == "rejected" and parent.data.tags[TAG_GATE_REASON].startswith("DINO")
    assert client.search_registered_models() == []  # a rejected model is not registered
    assert "rejected (DINO" in printed["quality gate"]
    job_dir = Path(printed["model"].strip()).parent.parent
    _check_kfp_outputs(job_dir)
    assert "**rejected** - DINO" in (job_dir / "evaluate" / "report").read_text()


@pytest.mark.slow
def test_run_tracks_into_an_mlflow_server(tmp_path, mlflow_server):
    config = _quick_config(tmp_path, experiment="served")
    result = _cli("run", "--config", config, "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
                  "--output-dir", str(tmp_path / "outputs"), "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{mlflow_server}/#/experiments/" in result.stdout
    client = MlflowClient(mlflow_server)
    parent = _check_tracked_run(client, "served", stages=STAGE_RUNS + SUPERRES_RUNS)
    assert parent.data.tags[TAG_GATE] == "passed"
    children = client.search_runs([parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'")
    upscaling = next(run for run in children if run.data.tags[TAG_STAGE] == "super-resolution")
    assert [m.step for m in client.get_metric_history(upscaling.info.run_id, "loss")] == list(range(1, 7))
    assert "superres-comparison.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    for label in ("generic", "personalised"):
        assert f"eval/upscaled_{label}/dino" in parent.data.metrics
    assert "upscaler:" in result.stdout

    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    mlflow.set_tracking_uri(mlflow_server)
    registered = mlflow.pyfunc.load_model("models:/dreambooth-dog@candidate")
    generated = registered.predict(pd.DataFrame({"prompt": ["a dog on the beach"], "num_inference_steps": [2]}))
    assert Image.open(io.BytesIO(generated["image_png"][0])).size == (64, 64)


@pytest.mark.slow
def test_a_diverging_fine_tune_fails_the_run_with_the_reason_in_mlflow(tmp_path, mlflow_server):
    config = _quick_config(tmp_path, experiment="diverging", learning_rate=1.0e30)
    result = _cli("run", "--config", config, "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
                  "--output-dir", str(tmp_path / "outputs"), "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert result.returncode == 1
    assert "error: stage fine-tune failed: training stopped at step" in result.stderr
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("diverging")
    runs = MlflowClient(mlflow_server).search_runs([experiment.experiment_id], f"tags.`{TAG_FAILED_STAGE}` = 'fine-tune'")
    assert runs and runs[0].info.status == "FAILED" and "loss is" in runs[0].data.tags[TAG_ERROR]


def test_evaluate_alone_scores_a_model_trained_elsewhere(tiny_model_dir, tmp_path):
    result = _cli("evaluate", "--config", "tiny", "--model", str(tiny_model_dir), "--identifier", "fqs",
                  "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--output-dir", str(tmp_path / "out"),
                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# DreamBench evaluation: `fqs` dog" in result.stdout
    assert json.loads((tmp_path / "out" / "evaluation" / "evaluation.json").read_text())["identifier"] == "fqs"
    assert "quality gate: passed, registered as dreambooth-dog@candidate (version 1)" in result.stdout
