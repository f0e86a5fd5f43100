"""`pipeline.py preflight` against the real services: the manifest's MLflow on PostgreSQL, the GCS
emulator and the recording KFP server. A ready cluster config passes every check; each kind of
fault fails its own check, in one line, while the others still pass."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from conftest import SAMPLE_SUBJECT, cli

# The manifest's MLflow listens on its fixed port: its tests share one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("deployed-mlflow")

PINNED = "registry.example/dreambooth-kfp@sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def photos_on_gcs(gcs_emulator, tmp_path_factory):
    from dreambooth.storage import upload_folder

    upload_folder(SAMPLE_SUBJECT, f"gs://{gcs_emulator}/preflight/dog")
    folder = tmp_path_factory.mktemp("subjects")
    (folder / "subjects.yaml").write_text(yaml.safe_dump({"subjects": [{"id": "dog", "photos": f"gs://{gcs_emulator}/preflight/dog", "class_noun": "dog"}]}))
    upload_folder(folder, f"gs://{gcs_emulator}/preflight/catalogue")
    return f"gs://{gcs_emulator}/preflight/catalogue/subjects.yaml"


def _config(folder, bucket, **changes) -> str:
    """gke-sd15 with the tiny models (no weights here), a pinned image and a pipeline root on the emulator."""
    raw = {
        "extends": "gke-sd15",
        "model": {"base": "tiny://sd"},
        "superres": {"base": "tiny://sd-upscaler"},
        "evaluation": {"dino_model": "tiny://dino", "clip_model": "tiny://clip", "lpips_model": "tiny://lpips"},
        "cluster": {"image": PINNED, "pipeline_root": f"gs://{bucket}/pipeline-root"},
    }
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = folder / "ready.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _preflight(config, *args, env=None, cwd, in_process=None):
    return cli("preflight", "--config", config, *args, cwd=cwd, env={**os.environ, **(env or {})}, timeout=120, in_process=in_process)


@pytest.fixture
def ready(tmp_path, gcs_emulator, deployed_mlflow, photos_on_gcs, kfp_api):
    """Everything a first deploy needs, in place: returns (config, arguments, KFP recording server)."""
    host, requests, server = kfp_api
    server.multi_user, server.token = True, "sa-token"
    (tmp_path / "token").write_text("sa-token")
    _, address, _ = deployed_mlflow
    arguments = ["--host", host, "--token-file", str(tmp_path / "token"), "--mlflow-via", address, "--subjects-uri", photos_on_gcs]
    return _config(tmp_path, gcs_emulator), arguments, requests


def _lines(result) -> dict[str, str]:
    return {line[6:].split()[0]: line[:4].strip() for line in result.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")}


def test_a_ready_deploy_passes_every_check_in_seconds(ready, tmp_path):
    config, arguments, requests = ready
    started = time.monotonic()
    result = _preflight(config, *arguments, cwd=tmp_path, in_process=False)  # the command's smoke test
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    assert _lines(result) == dict.fromkeys(
        ["model.base", "superres.base", "evaluation.dino_model", "evaluation.clip_model", "evaluation.lpips_model",
         "tracking.uri", "subjects", "cluster.image", "cluster.pipeline_root", "kfp"], "ok")
    assert "accepts Host mlflow.dreambooth-dev.svc.cluster.local:5000" in result.stdout
    listed = [path for method, path, _, headers in requests if "/experiments" in path and headers.get("authorization") == "Bearer sa-token"]
    assert listed and "namespace=dreambooth-dev" in listed[0]


@pytest.mark.parametrize(
    "fault, failing, message",
    [
        ("base model folder missing", "model.base", "'/nowhere/sd' is not a folder here"),
        ("hub model offline, not cached", "evaluation.dino_model", "is not in the Hugging Face cache"),
        ("LPIPS weights offline, not cached", "evaluation.lpips_model", "is not in the model cache"),
        ("MLflow refuses the host name", "tracking.uri", "refuses the Host header 'mlflow.dreambooth-dev.svc.cluster.local:5000' (403)"),
        ("MLflow unreachable", "tracking.uri", "is unreachable"),
        ("photos missing", "subjects", "no photos at gs://"),
        ("image not built", "cluster.image", "the digest is the shipped placeholder"),
        ("bucket not writable", "cluster.pipeline_root", "cannot write there"),
        ("KFP refuses the token", "kfp", "answered 401"),
        ("KFP unreachable", "kfp", "is unreachable"),
    ],
)
def test_each_fault_fails_its_own_check(ready, tmp_path, gcs_emulator, mlflow_server, fault, failing, message):
    config, arguments, _ = ready
    env = {}
    options = dict(zip(arguments[::2], arguments[1::2]))
    if fault == "base model folder missing":
        config = _config(tmp_path, gcs_emulator, model={"base": "/nowhere/sd"})
    elif fault == "hub model offline, not cached":
        config = _config(tmp_path, gcs_emulator, evaluation={"dino_model": "facebook/dino-vits16"})
        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    elif fault == "LPIPS weights offline, not cached":
        config = _config(tmp_path, gcs_emulator, evaluation={"lpips_model": "lpips://alexnet-v0.1"})
        env = {"HF_HUB_OFFLINE": "1", "DREAMBOOTH_CACHE": str(tmp_path / "empty-cache")}
    elif fault == "MLflow refuses the host name":
        options["--mlflow-via"] = mlflow_server  # an MLflow started without --allowed-hosts
    elif fault == "MLflow unreachable":
        options["--mlflow-via"] = "http://127.0.0.1:9"
    elif fault == "photos missing":
        options.pop("--subjects-uri")
        options.update({"--subject-uri": f"gs://{gcs_emulator}/preflight/cat", "--class-noun": "cat"})
    elif fault == "image not built":
        config = _config(tmp_path, gcs_emulator, cluster={"image": "us-docker.pkg.dev/p/d@sha256:" + "0" * 64})
    elif fault == "bucket not writable":
        config = _config(tmp_path, gcs_emulator, cluster={"pipeline_root": "gs://no-such-bucket/pipeline-root"})
    elif fault == "KFP refuses the token":
        (tmp_path / "token").write_text("expired-token")
    elif fault == "KFP unreachable":
        options["--host"] = "http://127.0.0.1:9"
    result = _preflight(config, *[part for pair in options.items() for part in pair], env=env, cwd=tmp_path)
    assert result.returncode == 1
    lines = _lines(result)
    assert [name for name, state in lines.items() if state == "FAIL"] == [failing], result.stdout
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert message in line, line
    assert f"failed: {failing}" in result.stdout.splitlines()[-1]


def test_submit_checks_first_then_creates_the_run_in_the_namespace(ready, tmp_path):
    config, arguments, requests = ready
    result = cli("submit", "--config", config, *arguments, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preflight: 10/10 passed" in result.stdout and "run:          run-42" in result.stdout
    created = [body for method, path, body, _ in requests if method == "POST" and path.startswith("/apis/v2beta1/experiments")]
    assert created and created[0]["namespace"] == "dreambooth-dev"


def _compute(config, allow_cpu=False) -> str:
    from dreambooth.commands.preflight import check_compute

    return check_compute(config, allow_cpu)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_a_fine_tune_too_long_for_this_cpu_is_refused_with_its_estimate_unless_allowed():
    from dreambooth.config import load_config
    from dreambooth.errors import InputError
    from dreambooth.models.loading import denoiser_parameters
    from dreambooth.models.tiny import resolve_tiny_model

    folder = str(resolve_tiny_model("tiny://sd"))  # a real diffusers folder: its UNet's size is read from the file headers
    parameters = denoiser_parameters(folder)
    unet = __import__("diffusers").UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert parameters == sum(parameter.numel() for parameter in unet.parameters())
    assert _compute(load_config("tiny")) == "tiny model: made for a CPU"
    quick = load_config("tiny", {"model": {"base": folder}, "training": {"max_steps": 100}})
    assert "of fine-tune on this CPU" in _compute(quick)
    # As many steps of this small UNet as a full-size model's thousand: hours, refused with the figure.
    steps = int(1000 * 859.5e6 / parameters)
    long = load_config("tiny", {"model": {"base": folder, "resolution": 512}, "training": {"max_steps": steps}})
    with pytest.raises(InputError) as refused:
        _compute(long)
    hours = 1000 * 44.6 * 2 / (os.cpu_count() or 1) / 3600
    assert f"take about {hours:,.0f} h on this CPU" in str(refused.value) and "--allow-cpu" in str(refused.value)
    assert _compute(long, allow_cpu=True).startswith("no CUDA GPU: ")
