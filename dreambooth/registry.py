"""Fine-tuned pipelines as MLflow models: logged once, registered as `candidate` when they pass the gate.

The diffusers folder travels inside an MLflow pyfunc model, so `mlflow.pyfunc.load_model`
gives back something that generates: a DataFrame of prompts in, PNG bytes out.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow.pyfunc

CANDIDATE_ALIAS = "candidate"
PIPELINE_ARTIFACT = "pipeline"
REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "requirements.txt"


class DiffusersPipelineModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame[prompt, seed?, num_inference_steps?, guidance_scale?]) -> DataFrame[prompt, image_png]."""

    def load_context(self, context) -> None:
        from dreambooth.models import load_pipeline

        self.pipeline = load_pipeline(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        rows = []
        for row in model_input.to_dict("records"):
            image = self.pipeline(
                row["prompt"],
                num_inference_steps=int(row.get("num_inference_steps", 30)),
                guidance_scale=float(row.get("guidance_scale", 7.5)),
                generator=torch.Generator("cpu").manual_seed(int(row.get("seed", 0))),
            ).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            rows.append({"prompt": row["prompt"], "image_png": buffer.getvalue()})
        return pd.DataFrame(rows)


def _requirements() -> list[str]:
    if not REQUIREMENTS_FILE.is_file():
        return []
    lines = REQUIREMENTS_FILE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-"))]


def log_pipeline_model(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log the folder as a pyfunc model on `run_id`; returns its model URI."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=DiffusersPipelineModel(),
            artifacts={PIPELINE_ARTIFACT: str(model_dir)},
            pip_requirements=_requirements(),  # listed, not inferred: inference would load the model
        )
    return info.model_uri


def register_candidate(tracking_uri: str, model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register `model_uri` under `name`, point the `candidate` alias at it; returns the version."""
    from mlflow.tracking import MlflowClient

    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(model_uri, name, tags=tags)
    MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
    return str(version.version)
