"""Shared fixtures: the offline tiny model, a tiny config, the sample subject, a real MLflow server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SUBJECT = REPO / "examples" / "subjects" / "dog"
SAMPLE_OBJECT = REPO / "examples" / "subjects" / "backpack"


def cli(*args, cwd, env=None, timeout=900):
    """`python pipeline.py ...` as a user runs it, in its own process."""
    return subprocess.run(
        [sys.executable, str(REPO / "pipeline.py"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )


def quick_config(folder: Path, experiment="dreambooth", gate=None, superres=True, **training) -> str:
    """The tiny config, shrunk further so a whole pipeline run takes well under a minute per subject."""
    import yaml

    path = folder / f"quick-{experiment}.yaml"
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["priors"]["num_class_images"] = 4
    raw["training"].update({"max_steps": 8, "checkpoint_every": 4, **training})
    raw["tracking"] = {"experiment": experiment}
    raw["superres"].update({"enabled": superres, "training": {"max_steps": 6, "learning_rate": 1.0e-4, "checkpoint_every": 3}})
    raw["evaluation"].update({"max_prompts_per_category": 1, "gate": gate or raw["evaluation"]["gate"]})
    raw["samples"].update({"images_per_prompt": 1, "prompts": ["a {identifier} {class_noun} on the beach", "a {identifier} {class_noun} in the snow"]})
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def dag_tasks(spec: dict) -> dict:
    """Every task of the compiled DAG, nested groups included: {task name: (enclosing component, task spec)}."""
    found = {}
    for component, body in spec["components"].items():
        for name, task in body.get("dag", {}).get("tasks", {}).items():
            found[name] = (component, task)
    found.update({name: ("root", task) for name, task in spec["root"]["dag"]["tasks"].items()})
    return found


def copy_photos(source: Path, target: Path, names: list[str]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, target / name)
    return target


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


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (the machine image's PostgreSQL 15 binaries) on a loopback port.

    Yields a libpq URI for a fresh `mlflow` database. PostgreSQL refuses to run as root, so as
    root the server runs as `nobody` on a data folder that user owns.
    """
    import psycopg

    if not shutil.which("initdb"):
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH")
    root = Path(tempfile.mkdtemp(prefix="dreambooth-postgres-"))
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "nobody")
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, "initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    options = f"-p {port} -h 127.0.0.1 -k {root}"
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    admin = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute("CREATE DATABASE mlflow")
    admin.close()
    yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)
