"""The one model loader: an unreachable hub fails in seconds with one line; a cached copy is used offline."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import SAMPLE_SUBJECT, cli

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture
def silent_hub():
    """A hub endpoint that accepts connections and never answers: the worst an unreachable hub does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def _env(tmp_path: Path, **extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), **extra}


@pytest.mark.slow  # waits out the hub's timeouts
def test_an_unreachable_hub_fails_ingest_within_30_seconds_naming_the_model_and_the_way_out(tmp_path, silent_hub):
    started = time.monotonic()
    result = cli("ingest", "--config", "sd15", "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
                 "--output-dir", str(tmp_path / "out"), cwd=tmp_path, env=_env(tmp_path, HF_ENDPOINT=silent_hub), timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.base:"), result.stderr
    assert SD15 in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "--config tiny" in lines[0]
    assert elapsed < 30


def test_offline_without_a_cached_copy_says_so_at_once(tmp_path):
    result = cli("ingest", "--config", "sd15", "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--identifier", "sks",
                 "--output-dir", str(tmp_path / "out"), cwd=tmp_path, env=_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=60)
    assert result.returncode == 2
    assert "is not in the Hugging Face cache" in result.stderr and "dreambooth warm-cache" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was checked against an empty tokenizer


def _cache_as_hub_snapshot(model_dir: Path, hf_home: Path, repo_id: str) -> Path:
    """The layout huggingface_hub writes when it downloads `repo_id` (refs/main -> snapshots/<commit>)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_offline_a_cached_hub_model_loads_from_the_cache(tmp_path, tiny_model_dir):
    _cache_as_hub_snapshot(tiny_model_dir, tmp_path / "hf-home", "acme/tiny-sd")
    result = cli("ingest", "--config", "tiny", "--base-model", "acme/tiny-sd", "--subject-dir", str(SAMPLE_SUBJECT),
                 "--class-noun", "dog", "--output-dir", str(tmp_path / "out"), cwd=tmp_path,
                 env=_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "images ready" in result.stdout


@pytest.mark.slow  # waits out the hub's timeouts
def test_an_unreachable_hub_falls_back_to_a_cached_copy(tmp_path, tiny_model_dir, silent_hub, monkeypatch):
    from huggingface_hub import constants

    from dreambooth.models import loading as models

    _cache_as_hub_snapshot(tiny_model_dir, tmp_path / "hf-home", "acme/tiny-sd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", silent_hub)
    models._hub_source.cache_clear()
    source = models.resolve_model_source("acme/tiny-sd")
    assert Path(source).is_dir() and (Path(source) / "model_index.json").is_file()
    with pytest.raises(models.InputError, match="cannot reach the Hugging Face hub .* 'acme/other'"):
        models.resolve_model_source("acme/other", setting="evaluation.dino_model")


def test_a_tokenizer_without_its_files_is_refused(tmp_path, tiny_model_dir):
    from dreambooth.errors import InputError
    from dreambooth.models.loading import load_tokenizer

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):  # its config left: transformers 5 builds an empty one
        (broken / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(InputError, match="has 2 tokens; its files are missing"):
        load_tokenizer(str(broken))
    (broken / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(InputError, match="cannot load the tokenizer of"):
        load_tokenizer(str(broken))
    assert len(load_tokenizer(str(tiny_model_dir))) > 1000


def test_a_missing_local_folder_is_named(tmp_path):
    from dreambooth.errors import InputError
    from dreambooth.models.loading import resolve_model_source

    with pytest.raises(InputError, match=r"superres.base: '/nowhere/upscaler' is not a folder here"):
        resolve_model_source("/nowhere/upscaler", setting="superres.base")


def test_lpips_weights_come_from_the_model_cache_and_offline_says_where_they_belong(tmp_path, monkeypatch):
    from dreambooth.errors import InputError
    from dreambooth.models.lpips import LpipsAlexNet, save_lpips
    from dreambooth.models.lpips_weights import lpips_cache_folder
    from dreambooth.models.loading import describe_model_source, resolve_model_source

    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"lpips://alexnet-v0.1 is not in the model cache .* HF_HUB_OFFLINE is set"):
        resolve_model_source("lpips://alexnet-v0.1", setting="evaluation.lpips_model")
    with pytest.raises(InputError, match="unknown 'lpips://vgg'"):
        resolve_model_source("lpips://vgg", setting="evaluation.lpips_model")
    folder = save_lpips(LpipsAlexNet(), lpips_cache_folder("alexnet-v0.1"))
    assert resolve_model_source("lpips://alexnet-v0.1") == str(folder)
    assert describe_model_source("lpips://alexnet-v0.1").startswith("in the model cache")


def test_warm_cache_puts_every_model_of_a_config_in_the_caches(tmp_path):
    env = _env(tmp_path, DREAMBOOTH_CACHE=str(tmp_path / "cache"))
    result = cli("warm-cache", "--config", "tiny", cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    ready = dict(line.split()[1:3] for line in result.stdout.splitlines() if line.startswith("ready"))
    assert set(ready) == {"model.base", "superres.base", "evaluation.dino_model", "evaluation.clip_model", "evaluation.lpips_model"}
    assert all(Path(folder).is_dir() and Path(folder).is_relative_to(tmp_path / "cache") for folder in ready.values())

    offline = cli("warm-cache", "--config", "sd15", cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert offline.returncode == 1
    assert [line.split()[1] for line in offline.stdout.splitlines() if line.startswith("FAIL")] == [
        "model.base", "superres.base", "evaluation.dino_model", "evaluation.clip_model", "evaluation.lpips_model"]


def test_pickle_weights_load_only_when_a_setting_allows_them(tmp_path, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from dreambooth.errors import InputError
    from dreambooth.models.loading import allow_pickle_weights, load_pipeline

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    unet = UNet2DConditionModel.from_pretrained(pickled / "unet")
    for weights in (pickled / "unet").glob("*.safetensors"):
        weights.unlink()
    unet.save_pretrained(pickled / "unet", safe_serialization=False)  # a .bin: unpickled, it could run code

    with pytest.raises(InputError, match=r"only safetensors weights load.*model.allow_pickle: true"):
        load_pipeline(str(pickled))
    allow_pickle_weights(True)
    try:
        assert load_pipeline(str(pickled)).unet.config.in_channels == unet.config.in_channels
    finally:
        allow_pickle_weights(False)
