"""Fine-tuned pipelines as MLflow models: logged once, registered as `candidate` when they pass the gate.

The diffusers folder travels inside an MLflow pyfunc model, so `mlflow.pyfunc.load_model`
gives back something that generates: a DataFrame of prompts in, PNG bytes out. The model is
self-contained: this package rides along as code, its pip requirements are the versions of the
libraries it loads with (read from the installed distributions, not from a file of this
repository), and its signature says what goes in and out.
"""

from __future__ import annotations

import io
from importlib import metadata
from pathlib import Path

import mlflow.diffusers
import mlflow.pyfunc

CANDIDATE_ALIAS = "candidate"
PIPELINE_ARTIFACT = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent
# What loading and sampling a pipeline imports (pandas comes with mlflow itself).
RUNTIME_DISTRIBUTIONS = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "pillow", "numpy")


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


def runtime_requirements() -> list[str]:
    """The loading libraries pinned at the versions installed here (a build's local tag, e.g. +cpu, dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in RUNTIME_DISTRIBUTIONS]


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "prompt"),
        ColSpec("long", "seed", required=False),
        ColSpec("long", "num_inference_steps", required=False),
        ColSpec("double", "guidance_scale", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "prompt"), ColSpec("binary", "image_png")]))


def log_pipeline_model(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log a trained result on `run_id`; returns its model URI.

    A full pipeline folder becomes a pyfunc model carrying this package; a LoRA adapter is logged
    with MLflow's own diffusers flavour (the adapter file plus a base-model reference, megabytes),
    which loads anywhere MLflow and diffusers are installed.
    """
    import mlflow

    from dreambooth.models import LORA_WEIGHTS, adapter_base, resolve_model_source

    mlflow.set_tracking_uri(tracking_uri)
    base = adapter_base(str(model_dir))
    with mlflow.start_run(run_id=run_id):
        if base is not None:
            # tiny:// exists only for this project: the flavour gets the folder it resolves to.
            reference = resolve_model_source(base[0], base[1]) if base[0].startswith("tiny://") else base[0]
            info = mlflow.diffusers.log_model(model_dir / LORA_WEIGHTS, base_model=reference, name="model")
            return info.model_uri
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=DiffusersPipelineModel(),
            artifacts={PIPELINE_ARTIFACT: str(model_dir)},
            code_paths=[str(PACKAGE_DIR)],  # loads where this repository is not installed
            signature=model_signature(),
            pip_requirements=runtime_requirements(),  # listed, not inferred: inference would load the model
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
