"""The package as the component image installs it: non-editable, away from this checkout.

docker/Dockerfile copies pyproject.toml, README.md and dreambooth/ and runs `pip install --no-deps .`
into a virtual environment; the model-cache Job then runs `dreambooth warm-cache --config gke-sd15`.
This does the same without Docker: the pinned stack comes from the test environment (one .pth line),
the project itself only from the fresh install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def _copied_as_the_dockerfile_does(target: Path) -> Path:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md ./" in dockerfile and "COPY dreambooth ./dreambooth" in dockerfile
    source = target / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "dreambooth", source / "dreambooth", ignore=shutil.ignore_patterns("__pycache__"))
    return source


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding a non-editable install of the package; yields its bin folder."""
    root = tmp_path_factory.mktemp("image-layout")
    source = _copied_as_the_dockerfile_does(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # A .pth line only adds a folder: the test environment's editable finder (its own .pth) never runs.
    Path(site, "pinned-stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert install.returncode == 0, install.stderr
    shutil.rmtree(source)  # nothing may read the copied sources after the install
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_HUB_OFFLINE")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_installed_package_imports_without_the_repository(installed, tmp_path):
    found = _run(installed, str(installed / "python"), "-I", "-c", "import dreambooth, dreambooth.dag.pipeline; print(dreambooth.__file__)",
                 cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(installed.parent) and not Path(found.stdout.strip()).is_relative_to(REPO)


def test_the_cache_job_finds_the_shipped_cluster_config_and_stops_at_the_hub(installed, tmp_path):
    """What the model-cache Job runs (its exact command from manifests/), offline: refused at the hub, not at the config."""
    job = yaml.safe_load((REPO / "manifests" / "base" / "model-cache-prepare.yaml").read_text())
    (warm,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "warm-cache"]
    result = _run(installed, *warm["command"], *warm["args"], cwd=tmp_path)
    assert "config file not found" not in result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("FAIL   model.base") and "cannot reach the Hugging Face hub" in first, result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_the_installed_command_compiles_the_cluster_pipeline(installed, tmp_path):
    result = _run(installed, "dreambooth", "compile", "--config", "gke-sd15", "--output", "dreambooth.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = next(yaml.safe_load_all((tmp_path / "dreambooth.yaml").read_text()))
    assert spec["pipelineInfo"]["name"] == "dreambooth" and "comp-fine-tune" in spec["components"]
