"""Shared fixtures: the offline tiny model, a tiny config, the sample subject, a real MLflow server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SUBJECT = REPO / "examples" / "subjects" / "dog"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Tiny models are built once per test session, in a private cache (subprocesses inherit it)."""
    cache = Path(os.environ.get("DREAMBOOTH_TEST_CACHE") or tmp_path_factory.mktemp("model-cache"))
    os.environ["DREAMBOOTH_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache) -> Path:
    from dreambooth.models import resolve_model_source

    return Path(resolve_model_source("tiny://sd"))


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    target = tmp_path / "dog"
    shutil.copytree(SAMPLE_SUBJECT, target)
    return target


@pytest.fixture
def make_config(tmp_path):
    """The shipped tiny config with test-sized overrides (nested dicts merge into it)."""
    from dreambooth.config import load_config

    def make(**sections):
        overrides = {"subject": {"class_noun": "dog", "name": "dog"}, "storage": {"work_dir": str(tmp_path / "work")}}
        for section, values in sections.items():
            overrides[section] = {**overrides.get(section, {}), **values}
        return load_config("tiny", overrides)

    return make


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve_mlflow(root: Path, artifacts_destination: str):
    """A real `mlflow server` process on 127.0.0.1 with a sqlite backend and proxied artifacts."""
    port = _free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", artifacts_destination,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}")
        time.sleep(0.5)
    yield uri
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    yield from _serve_mlflow(root, str(root / "artifacts"))


GCS_BUCKET = "dreambooth-test"


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real GCS JSON API emulator (gcp-storage-emulator) on 127.0.0.1; subprocesses inherit its address."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GOOGLE_CLOUD_PROJECT"] = "dreambooth-test"
    yield GCS_BUCKET
    server.stop()
    os.environ.pop("STORAGE_EMULATOR_HOST", None)


@pytest.fixture(scope="session")
def mlflow_server_on_gcs(tmp_path_factory, gcs_emulator):
    """An mlflow server whose artifact destination is a bucket on the emulator."""
    root = tmp_path_factory.mktemp("mlflow-server-gcs")
    yield from _serve_mlflow(root, f"gs://{gcs_emulator}/mlflow")
