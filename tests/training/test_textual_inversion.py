"""Textual inversion and pivotal tuning: only the new token's rows (and, pivotal, the adapter) move,
the file loads in diffusers as in our loader, and the pivotal embedding freezes at its fraction."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from dreambooth.errors import InputError
from dreambooth.evaluation.learning import learning_check
from dreambooth.fine_tune import fine_tune
from dreambooth.ingest.photos import ingest_subject
from dreambooth.models.loading import EMBEDDINGS_FILE, LORA_WEIGHTS, METADATA_FILE, load_pipeline, resolve_model_source
from dreambooth.priors import generate_class_priors
from dreambooth.training import loop
from dreambooth.training.embeddings import NewTokenRows


@pytest.fixture
def prepared(make_config, subject_dir, tmp_path):
    """Ingested photos and class images for a method that learns a token; (config, identifier)."""
    def prepare(family="sd", **training):
        config = make_config(model={"base": f"tiny://{family}", "resolution": 64},
                             priors={"num_class_images": 2, "sampler": {"num_inference_steps": 2, "batch_size": 2}},
                             training={"checkpoint_every": 100, "learning_rate": 1e-2, **training})
        identifier = ingest_subject(subject_dir, tmp_path / "subject", config).identifier.identifier
        generate_class_priors(config, tmp_path / "classes")
        return config, identifier

    return prepare


def _state(module) -> dict:
    return {key: value.clone() for key, value in module.state_dict().items()}


def _draw(pipeline, prompt: str) -> np.ndarray:
    return pipeline(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


def test_textual_inversion_moves_only_the_new_rows_and_loads_in_diffusers(prepared, tmp_path, monkeypatch):
    config, identifier = prepared(method="textual_inversion", max_steps=12,
                                  textual_inversion={"num_vectors": 2, "learning_rate": 5e-2})
    assert identifier == "<dog>"  # a new token, named after the subject
    base = load_pipeline("tiny://sd")
    before = {name: _state(getattr(base, name)) for name in ("unet", "vae", "text_encoder")}
    trained = []  # the pipeline the fine-tune loads and trains, as it is when training ends
    monkeypatch.setattr("dreambooth.fine_tune.load_pipeline", lambda *args, **kwargs: trained.append(load_pipeline(*args, **kwargs)) or trained[-1])
    fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "embedding")

    files = sorted(path.name for path in (tmp_path / "embedding").iterdir())
    assert files == sorted([EMBEDDINGS_FILE, METADATA_FILE])
    saved = load_file(tmp_path / "embedding" / EMBEDDINGS_FILE)
    assert list(saved) == [identifier] and saved[identifier].shape == (2, 32)  # two vectors of the tiny CLIP's width
    assert (tmp_path / "embedding" / EMBEDDINGS_FILE).stat().st_size < 2_000

    # The trained model: every base weight bit-identical, only the new token's rows moved.
    trained = trained[0]
    for name in ("unet", "vae"):
        after = getattr(trained, name).to("cpu").state_dict()
        assert all(torch.equal(before[name][key], after[key]) for key in before[name]), name
    table_key = next(key for key in before["text_encoder"] if key.endswith("token_embedding.weight"))
    after = trained.text_encoder.to("cpu").state_dict()
    assert after.keys() == before["text_encoder"].keys()  # the plain table is back in place
    assert all(torch.equal(before["text_encoder"][key], after[key]) for key in before["text_encoder"] if key != table_key)
    old_rows = before["text_encoder"][table_key]
    assert torch.equal(after[table_key][: len(old_rows)], old_rows)
    new_ids = trained.tokenizer.convert_tokens_to_ids([identifier, f"{identifier}_1"])
    initial = old_rows[base.tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
    assert all((after[table_key][token] - initial).abs().max() > 1e-3 for token in new_ids)  # both vectors trained
    assert torch.equal(saved[identifier], after[table_key][new_ids])
    ours = load_pipeline(str(tmp_path / "embedding"))

    # diffusers' own loader, given the folder, draws what ours draws
    reference = DiffusionPipeline.from_pretrained(resolve_model_source("tiny://sd"))
    reference.load_textual_inversion(tmp_path / "embedding")
    prompt = f"a {identifier} dog on the beach"
    assert np.abs(_draw(reference, prompt) - _draw(ours, prompt)).max() < 1e-5
    assert np.abs(_draw(ours, prompt) - _draw(ours, "a dog on the beach")).max() > 1e-3

    check = learning_check(str(tmp_path / "embedding"), tmp_path / "subject", None, identifier, config)
    assert check.subject_tuned < check.subject_base  # the token learned the subject's photos

    # Registered like any result: a pyfunc model whose pipeline artifact is the embedding folder (kilobytes), served.
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from dreambooth.tracking.registry import log_pipeline_model

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    run = mlflow.MlflowClient(tracking).create_run(mlflow.MlflowClient(tracking).create_experiment("ti")).info.run_id
    model_uri = log_pipeline_model(tracking, run, tmp_path / "embedding")
    (logged,) = (Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "logged"))) / "artifacts").iterdir()
    assert sorted(path.name for path in logged.iterdir()) == sorted([EMBEDDINGS_FILE, METADATA_FILE])
    assert sum(path.stat().st_size for path in logged.iterdir()) < 10_000
    served = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"prompt": [prompt], "num_inference_steps": [2], "seed": [0]}))
    assert Image.open(io.BytesIO(served["image_png"][0])).size == (64, 64)


def test_an_sdxl_embedding_holds_one_tensor_per_text_encoder_in_the_web_ui_layout(prepared, tmp_path):
    config, identifier = prepared("sdxl", method="textual_inversion", max_steps=3)
    fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "embedding")
    saved = load_file(tmp_path / "embedding" / EMBEDDINGS_FILE)
    base = load_pipeline("tiny://sdxl")
    widths = (base.text_encoder.config.hidden_size, base.text_encoder_2.config.hidden_size)
    assert {key: tuple(value.shape) for key, value in saved.items()} == {"clip_l": (1, widths[0]), "clip_g": (1, widths[1])}

    reference = DiffusionPipeline.from_pretrained(resolve_model_source("tiny://sdxl"))
    for key, encoder, tokenizer in (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2")):
        reference.load_textual_inversion(saved[key], token=identifier, text_encoder=getattr(reference, encoder),
                                         tokenizer=getattr(reference, tokenizer))
    ours = load_pipeline(str(tmp_path / "embedding"))
    prompt = f"a {identifier} dog"
    assert np.abs(_draw(reference, prompt) - _draw(ours, prompt)).max() < 1e-5


def test_pivotal_tuning_trains_adapter_and_embedding_and_the_embedding_freezes_at_its_fraction(prepared, tmp_path, monkeypatch):
    config, identifier = prepared(method="pivotal", max_steps=6, textual_inversion={"train_fraction": 0.5, "learning_rate": 5e-2})
    snapshots = {}  # each step's embedding rows, read where the driver keeps them while training
    real_train = loop.train

    def watching_train(*args, **kwargs):
        bound = inspect.signature(real_train).bind(*args, **kwargs)
        rows = bound.arguments["modules"]["text_encoder"].get_input_embeddings()
        assert isinstance(rows, NewTokenRows)
        on_step = bound.arguments.get("on_step")

        def record(step):
            snapshots[step] = rows.rows.detach().clone()
            if on_step:
                on_step(step)

        bound.arguments["on_step"] = record
        return real_train(*bound.args, **bound.kwargs)

    monkeypatch.setattr("dreambooth.training.driver.train", watching_train)
    fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "pivotal")

    files = sorted(path.name for path in (tmp_path / "pivotal").iterdir())
    assert files == sorted([EMBEDDINGS_FILE, LORA_WEIGHTS, METADATA_FILE])
    assert json.loads((tmp_path / "pivotal" / METADATA_FILE).read_text())["method"] == "pivotal"
    assert {key.split(".")[0] for key in load_file(tmp_path / "pivotal" / LORA_WEIGHTS)} == {"unet"}
    assert not torch.equal(snapshots[1], snapshots[3])  # the embedding trained over its 3 steps (half of 6)
    for step in (4, 5, 6):
        assert torch.equal(snapshots[step], snapshots[3]), step  # and then stayed where it was
    trained = load_file(tmp_path / "pivotal" / EMBEDDINGS_FILE)[identifier]
    assert torch.equal(trained, snapshots[6])

    base, ours = load_pipeline("tiny://sd"), load_pipeline(str(tmp_path / "pivotal"))
    lora_only = load_pipeline("tiny://sd")
    lora_only.load_lora_weights(tmp_path / "pivotal", weight_name=LORA_WEIGHTS)
    prompt = f"a {identifier} dog"
    lora_only.load_textual_inversion(tmp_path / "pivotal")
    assert np.abs(_draw(lora_only, prompt) - _draw(ours, prompt)).max() < 1e-5  # diffusers' two loaders, one result
    assert np.abs(_draw(ours, prompt) - _draw(base, prompt)).max() > 1e-3


def test_the_methods_that_learn_a_token_refuse_what_they_cannot_do(prepared, make_config, tmp_path):
    with pytest.raises(InputError, match="training.method: textual_inversion is not available for flux models"):
        config, identifier = prepared("flux", method="textual_inversion", max_steps=1)
        fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "x")
    with pytest.raises(InputError, match="training.train_text_encoder: pivotal trains the new token's embedding"):
        make_config(training={"method": "pivotal", "train_text_encoder": True})
    config, identifier = prepared(method="textual_inversion", max_steps=1)
    no_class = config.model_copy(update={"subject": config.subject.model_copy(update={"class_noun": ""})})
    with pytest.raises(InputError, match="training.textual_inversion.initializer: the subject has no class noun"):
        fine_tune(tmp_path / "subject", None, identifier, no_class.model_copy(update={"priors": no_class.priors.model_copy(update={"enabled": False})}),
                 tmp_path / "y")
