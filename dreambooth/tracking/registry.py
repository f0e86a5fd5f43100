"""Fine-tuned pipelines as MLflow models: logged once, registered as `candidate` when they pass the
gate, promoted (an alias such as `champion`) by a reviewer.

The diffusers folder travels inside an MLflow pyfunc model, so `mlflow.pyfunc.load_model`
gives back something that generates: a DataFrame of prompts in, PNG bytes out. The model is
self-contained: this package rides along as code, its pip requirements are the versions of the
libraries it loads with (read from the installed distributions, not from a file of this
repository), and its signature says what goes in and out.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import mlflow.diffusers
import mlflow.pyfunc

from dreambooth.errors import InputError
from dreambooth.tracking.layout import TAG_EVAL_PROTOCOL, TAG_PROMOTED, TAG_REVIEW_NOTE
from dreambooth.tracking.store import client, patiently
from dreambooth.watermark import payload_for, save_marked

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"  # the version a reviewer promoted; evaluation.gate.against champion compares with it
PIPELINE_ARTIFACT = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # dreambooth/, which the pickled model class imports from
# What loading and sampling a pipeline imports (pandas comes with mlflow itself).
RUNTIME_DISTRIBUTIONS = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "pillow", "numpy")


class DiffusersPipelineModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame[prompt, seed?, num_inference_steps?, guidance_scale?]) -> DataFrame[prompt, image_png]."""

    # The signature is given when the model is logged (model_signature); without this MLflow warns,
    # on every import, that predict has no type hints.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from dreambooth.models.loading import load_pipeline

        self.pipeline = load_pipeline(context.artifacts[PIPELINE_ARTIFACT])
        self.watermark = payload_for(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        rows = []
        for record in model_input.to_dict("records"):
            given = {key: value for key, value in (params or {}).items() if value is not None}
            row = {**given, **{key: value for key, value in record.items() if pd.notna(value)}}  # a row's own value wins
            size = {side: int(row[side]) for side in ("height", "width") if side in row}
            image = self.pipeline(
                prompt=row["prompt"],  # by name: a reference-image pipeline takes its images first
                num_inference_steps=int(row.get("num_inference_steps", 30)),
                guidance_scale=float(row.get("guidance_scale", 7.5)),
                generator=torch.Generator("cpu").manual_seed(int(row.get("seed", 0))),
                **size,
            ).images[0]
            buffer = io.BytesIO()
            save_marked(image, buffer, self.watermark, format="PNG")
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
    # The same settings as params, for a whole request (as MLflow's diffusers flavour takes them); a row's own value wins.
    from mlflow.types.schema import ParamSchema, ParamSpec

    params = ParamSchema([ParamSpec(name, dtype, None) for name, dtype in
                          (("num_inference_steps", "long"), ("guidance_scale", "double"), ("height", "long"), ("width", "long"))])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "prompt"), ColSpec("binary", "image_png")]), params=params)


def log_pipeline_model(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log a trained result on `run_id` (waiting out a tracking outage, as every stage call does); returns its model URI."""
    return patiently(_log_pipeline_model, tracking_uri, run_id, model_dir)


def _log_pipeline_model(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log a trained result on `run_id`; returns its model URI.

    A full pipeline folder becomes a pyfunc model carrying this package, and so does a learned
    embedding (kilobytes, with or without an adapter: its folder names its base, which loads where
    the model is served); a LoRA adapter alone is logged with MLflow's own diffusers flavour (the
    adapter file plus a base-model reference, megabytes), which loads anywhere MLflow and diffusers
    are installed, unless plain diffusers cannot load its base without torchvision (FLUX.2 [dev]'s text
    processor): that adapter is a pyfunc model too, whose loader gives the base the processor's tokenizer.
    """
    import mlflow

    from dreambooth.models.loading import EMBEDDINGS_FILE, LORA_WEIGHTS, adapter_base, has_text_only_processor, resolve_model_source

    mlflow.set_tracking_uri(tracking_uri)
    base = adapter_base(str(model_dir))
    with mlflow.start_run(run_id=run_id):
        if base is not None and not (model_dir / EMBEDDINGS_FILE).is_file() and not has_text_only_processor(*base):
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


@dataclass(frozen=True)
class Champion:
    """The subject's current champion: its registered version, evaluation figures and protocol."""

    version: str
    overall: dict[str, float]
    protocol: str


def current_champion(tracking_uri: str, name: str):
    """The `champion` version of registered model `name` with its subject run's figures and protocol; None when there is none."""
    from mlflow.exceptions import MlflowException


    mlflow = client(tracking_uri)
    try:
        version = mlflow.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:  # no such model, or no version holds the alias
        return None
    run = mlflow.get_run(version.tags.get("subject_run") or version.run_id)
    overall = {name: run.data.metrics[f"eval/{name}"] for name in ("dino", "clip_t", "pres") if f"eval/{name}" in run.data.metrics}
    return Champion(str(version.version), overall, run.data.tags.get(TAG_EVAL_PROTOCOL, ""))


def register_candidate(tracking_uri: str, model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register `model_uri` under `name`, point the `candidate` alias at it; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    version = patiently(mlflow.register_model, model_uri, name, tags=tags)
    client(tracking_uri).set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
    return str(version.version)


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered subject model, with what a reviewer decides by."""

    name: str
    version: str
    aliases: list[str]
    subject_run: str
    metrics: dict[str, float]  # the subject run's headline evaluation figures
    note: str  # the last review note

    def figures(self) -> str:
        return "  ".join(f"{label} {self.metrics[key]:.3f}" for key, label in HEADLINE_METRICS.items() if key in self.metrics)


HEADLINE_METRICS = {"eval/dino": "DINO", "eval/clip_i": "CLIP-I", "eval/clip_t": "CLIP-T", "eval/pres": "PRES"}


def _unknown_model(mlflow, name: str, where: str) -> InputError:
    known = ", ".join(sorted(model.name for model in mlflow.search_registered_models())) or "none"
    return InputError(f"{where}: no registered model {name!r} (registered: {known})")


def _version(mlflow, name: str, version: Optional[str], alias: Optional[str]):
    """The model version asked for, by number or by alias; one line naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_registered_model(name)
    except MlflowException:
        raise _unknown_model(mlflow, name, "--model") from None
    try:
        return mlflow.get_model_version(name, version) if version else mlflow.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {version}" if version else f"alias @{alias}"
        raise InputError(f"--{'version' if version else 'alias'}: {name} has no {what}") from None


def promote(tracking_uri: str, name: str, to_alias: str, version: Optional[str] = None, from_alias: Optional[str] = None,
            note: str = "", reviewer: str = "") -> tuple[str, Optional[str]]:
    """Point `to_alias` (e.g. champion) at a version, chosen by number or by the alias it holds now;
    the reviewer's note goes on the version. Returns (version now, version it pointed at before)."""
    import datetime

    from mlflow.exceptions import MlflowException

    mlflow = client(tracking_uri)
    chosen = _version(mlflow, name, version, from_alias)
    try:
        before = mlflow.get_model_version_by_alias(name, to_alias).version
    except MlflowException:
        before = None
    mlflow.set_registered_model_alias(name, to_alias, chosen.version)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mlflow.set_model_version_tag(name, chosen.version, TAG_PROMOTED, f"{to_alias} by {reviewer or 'unknown'} at {when}")
    if note:
        mlflow.set_model_version_tag(name, chosen.version, TAG_REVIEW_NOTE, note)
    return str(chosen.version), (str(before) if before is not None else None)


def registered_versions(tracking_uri: str, name: Optional[str] = None) -> list[RegisteredVersion]:
    """Every version of every registered model (or of `name`), newest first, with aliases and figures."""
    mlflow = client(tracking_uri)
    models = mlflow.search_registered_models(filter_string=f"name = '{name}'" if name else None)
    if name and not models:
        raise _unknown_model(mlflow, name, "models")
    found = []
    for model in sorted(models, key=lambda m: m.name):
        aliases_of: dict[str, list[str]] = {}
        for alias, number in (model.aliases or {}).items():
            aliases_of.setdefault(str(number), []).append(alias)
        for version in sorted(mlflow.search_model_versions(f"name = '{model.name}'"), key=lambda v: -int(v.version)):
            subject_run = version.tags.get("subject_run") or version.run_id or ""
            metrics = {}
            if subject_run:
                metrics = {key: value for key, value in mlflow.get_run(subject_run).data.metrics.items() if key in HEADLINE_METRICS}
            found.append(RegisteredVersion(model.name, str(version.version), sorted(aliases_of.get(str(version.version), [])),
                                           subject_run, metrics, version.tags.get(TAG_REVIEW_NOTE, "")))
    return found
