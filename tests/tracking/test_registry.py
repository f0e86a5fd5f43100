"""A registered subject loads anywhere: in a fresh process that cannot import this repository."""

from __future__ import annotations

import shutil
import textwrap
from importlib import metadata

import mlflow
import pytest

from conftest import REPO, run_without_repository
from dreambooth.models.loading import METADATA_FILE
from dreambooth.tracking.registry import RUNTIME_DISTRIBUTIONS, log_pipeline_model, register_candidate

LOAD_AND_GENERATE = textwrap.dedent(
    """
    import io
    import mlflow, pandas as pd
    from PIL import Image

    mlflow.set_tracking_uri({tracking!r})
    model = mlflow.pyfunc.load_model("models:/{name}@candidate")
    import dreambooth
    assert not dreambooth.__file__.startswith({repo!r} + "/dreambooth"), dreambooth.__file__
    out = model.predict(pd.DataFrame([{{"prompt": "a fqs dog", "seed": 3, "num_inference_steps": 2}}]))
    image = Image.open(io.BytesIO(out["image_png"][0]))
    from dreambooth.watermark import detect
    print("generated", image.size, "marked", detect(image), "with dreambooth from", dreambooth.__file__)
    """
)


@pytest.mark.slow
def test_a_registered_model_generates_in_a_process_without_the_repository(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)  # a full pipeline result: its metadata holds the training fingerprint
    (model / METADATA_FILE).write_text('{"identifier": "fqs", "class_noun": "dog", "fingerprint": "5eed0f00dba5e000"}')
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    experiment = mlflow.create_experiment("registry", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    model_uri = log_pipeline_model(tracking, run.info.run_id, model)
    register_candidate(tracking, model_uri, "dreambooth-anywhere", {"subject": "dog"})

    info = mlflow.models.get_model_info(model_uri)
    assert [column.name for column in info.signature.inputs.inputs] == ["prompt", "seed", "num_inference_steps", "guidance_scale"]
    assert [column.name for column in info.signature.outputs.inputs] == ["prompt", "image_png"]
    requirements = mlflow.pyfunc.get_model_dependencies(model_uri)
    pinned = [line.strip() for line in open(requirements) if "==" in line]
    for name in RUNTIME_DISTRIBUTIONS:  # the versions installed here, not lines of a repository file
        assert f"{name}=={metadata.version(name).split('+')[0]}" in pinned
    assert not [line for line in pinned if line.startswith(("kfp", "google-cloud-storage", "matplotlib"))]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_without_repository(LOAD_AND_GENERATE.format(repo=str(REPO), tracking=tracking, name="dreambooth-anywhere"), elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated (64, 64) marked 5eed0f00" in result.stdout and str(tmp_path) in result.stdout


def test_promote_moves_an_alias_after_review_and_models_lists_it(tmp_path):
    """Two versions of a subject, v2 the candidate: a reviewer promotes the candidate to champion."""
    from mlflow.tracking import MlflowClient

    from conftest import cli

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = MlflowClient(tracking, registry_uri=tracking)
    experiment = mlflow_client.create_experiment("registry", artifact_location=str(tmp_path / "artifacts"))
    mlflow_client.create_registered_model("dreambooth-dog")
    for dino in (0.41, 0.63):
        run = mlflow_client.create_run(experiment)
        mlflow_client.log_metric(run.info.run_id, "eval/dino", dino)
        mlflow_client.log_metric(run.info.run_id, "eval/clip_t", 0.3)
        version = mlflow_client.create_model_version("dreambooth-dog", str(tmp_path), run.info.run_id, tags={"subject_run": run.info.run_id})
    mlflow_client.set_registered_model_alias("dreambooth-dog", "candidate", version.version)

    def command(*args):
        return cli(*args, "--tracking-uri", tracking, cwd=tmp_path)

    promoted = command("promote", "--model", "dreambooth-dog", "--alias", "candidate", "--to", "champion", "--note", "eyes right; approved")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.strip() == "dreambooth-dog@champion: version 2; note kept on version 2"
    assert mlflow_client.get_model_version_by_alias("dreambooth-dog", "champion").version == 2
    listed = cli("models", "--tracking-uri", tracking, cwd=tmp_path, in_process=False).stdout.splitlines()  # its smoke test
    assert listed[0] == "dreambooth-dog"
    assert listed[1].split()[:5] == ["version", "2", "@candidate", "@champion", "DINO"] and listed[1].endswith('"eyes right; approved"')
    assert "DINO 0.630" in listed[1] and "DINO 0.410" in listed[2] and "@" not in listed[2]

    # Back to version 1 by number: the alias moves, and says where it was.
    back = command("promote", "--model", "dreambooth-dog", "--version", "1", "--to", "champion")
    assert back.stdout.strip() == "dreambooth-dog@champion: version 1 (was version 2)"
    assert "@champion" in command("models", "dreambooth-dog").stdout.splitlines()[2]
    tags = mlflow_client.get_model_version("dreambooth-dog", "1").tags
    assert tags["dreambooth.promoted"].startswith("champion by ")

    for args, message in (
        (("--model", "dreambooth-cat", "--alias", "candidate"), "error: --model: no registered model 'dreambooth-cat' (registered: dreambooth-dog)"),
        (("--model", "dreambooth-dog", "--version", "9"), "error: --version: dreambooth-dog has no version 9"),
        (("--model", "dreambooth-dog", "--alias", "staging"), "error: --alias: dreambooth-dog has no alias @staging"),
    ):
        refused = command("promote", *args, "--to", "champion")
        assert refused.returncode == 2 and refused.stderr.splitlines() == [message]
    assert mlflow_client.get_model_version_by_alias("dreambooth-dog", "champion").version == 1  # nothing moved
