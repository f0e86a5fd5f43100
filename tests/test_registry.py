"""A registered subject loads anywhere: in a fresh process that cannot import this repository."""

from __future__ import annotations

import textwrap
from importlib import metadata

import mlflow
import pytest

from conftest import REPO, run_without_repository
from dreambooth.registry import RUNTIME_DISTRIBUTIONS, log_pipeline_model, register_candidate

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
    print("generated", image.size, "with dreambooth from", dreambooth.__file__)
    """
)


@pytest.mark.slow
def test_a_registered_model_generates_in_a_process_without_the_repository(tiny_model_dir, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    experiment = mlflow.create_experiment("registry", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    model_uri = log_pipeline_model(tracking, run.info.run_id, tiny_model_dir)
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
    assert "generated (64, 64)" in result.stdout and str(tmp_path) in result.stdout
