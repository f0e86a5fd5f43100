"""The package as the component image installs it: non-editable, away from this checkout.

docker/Dockerfile copies pyproject.toml, README.md and dreambooth/ and runs `pip install -c requirements.txt .`
into a virtual environment holding the pinned stack; the model-cache Job then runs
`dreambooth warm-cache --config gke-sd15`. This does the same without Docker: the pinned stack comes
from the test environment (one .pth line), the project itself only from the fresh install, whose
declared dependencies pip must find satisfied by the pins (no index to fetch anything else from).
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
    assert 'RUN pip install -c requirements.txt -c gpu-requirements.txt ".[gpu]"' in dockerfile
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
        [str(python), "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-index", "-c", str(REPO / "requirements.txt"),
         str(source)],
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
    result = _run(installed, "dreambooth", "compile", "--config", "gke-sd15", "--output", "dreambooth.yaml", "--allow-placeholders",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = next(yaml.safe_load_all((tmp_path / "dreambooth.yaml").read_text()))
    assert spec["pipelineInfo"]["name"] == "dreambooth" and "comp-fine-tune" in spec["components"]


def _third_party_imports() -> dict[str, str]:
    """{imported module (top-level; google.* in full): a file importing it} over the whole package, lazy imports too."""
    import ast

    found = {}
    for path in sorted((REPO / "dreambooth").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "dreambooth":
                    found.setdefault(".".join(name.split(".")[:3]) if top == "google" else top, str(path.relative_to(REPO)))
    return found


def _wheel_requirements(tmp_path: Path) -> list:
    """The Requires-Dist lines of a wheel built from this checkout, as packaging Requirements."""
    from email.parser import Parser
    from zipfile import ZipFile

    from packaging.requirements import Requirement

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("dreambooth_kfp-*.whl")
    with ZipFile(wheel) as archive:
        metadata = archive.read(next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))).decode()
    return [Requirement(line) for line in Parser().parsestr(metadata).get_all("Requires-Dist") or []]


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def test_the_wheel_declares_what_the_package_imports_and_the_pins_satisfy_it(tmp_path):
    """`pip install dist/*.whl` must bring everything the code imports: each import is a declared
    dependency (an extra for GPU-only ones) or comes with one; requirements.txt pins each within its range."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    from packaging.requirements import Requirement

    declared = _wheel_requirements(tmp_path)
    assert declared, "the wheel declares no dependencies: pip install gives a dreambooth that cannot import yaml"
    names = {_canonical(requirement.name) for requirement in declared}
    brought = set(names)  # what installing the declared ones brings along, two levels down
    for _ in range(2):
        for name in list(brought):
            try:
                brought |= {_canonical(Requirement(line).name) for line in requires(name) or [] if "extra ==" not in line}
            except PackageNotFoundError:  # a GPU-only extra, not installed on these machines
                pass
    providers = packages_distributions()
    missing = [f"{module} ({where})" for module, where in _third_party_imports().items()
               if not {_canonical(dist) for dist in providers.get(module.split(".")[0], [module])} & brought
               and _canonical(module) not in names]
    assert missing == [], f"imported but neither declared in pyproject.toml nor brought by what is: {missing}"

    pins = {_canonical(line.split("==")[0]): line.split("==")[1].split()[0]
            for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line and not line.startswith("#")}
    for requirement in declared:
        if requirement.marker is None:  # the runtime ones: each pinned, the pin inside the range
            assert _canonical(requirement.name) in pins, f"{requirement.name}: declared but not pinned in requirements.txt"
            assert requirement.specifier.contains(pins[_canonical(requirement.name)]), \
                f"{requirement.name}: requirements.txt pins {pins[_canonical(requirement.name)]}, outside {requirement.specifier}"
