"""The package's shape: its modules import each other in one direction only, importing one changes
nothing process-wide, and the MLflow run layout is written in one module.

Every import of a `dreambooth` module counts, the ones inside functions too: a lazy import only
hides a cycle until the day someone moves it to the top of the file.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "dreambooth"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, read from the source (a name imported from a
    package counts as its submodule when there is one)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dreambooth"):
                targets = [owner(f"{node.module}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [owner(alias.name) for alias in node.names if alias.name.startswith("dreambooth")]
            else:
                continue
            graph[name].update(target for target in targets if target != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    assert "dreambooth.dag.pipeline" in graph and graph["dreambooth.dag.pipeline"], "the graph was read"
    assert cycles(graph) == []


# The package's layers, top to bottom (docs/architecture.md): a module imports from its own layer and the ones
# below it, never from one above, lazily or not. A module's layer is its longest listed prefix.
LAYERS = (
    ("commands", ("cli", "commands")),
    ("dag", ("dag",)),
    ("components", ("dag.components",)),
    ("tasks", ("tasks",)),
    ("reports", ("reports",)),
    ("catalogue", ("catalogue",)),
    ("stages", ("ingest", "priors", "fine_tune", "samples", "super_resolution", "baseline", "evaluation")),
    ("training", ("training",)),
    ("tracking and generation", ("tracking", "generation", "watermark")),
    ("models", ("models",)),
    ("basics", ("", "config", "config_files", "stages", "errors", "process", "progress", "images", "storage", "archives")),
)
TOP_LEVEL_MODULES = {"cli", "config", "config_files", "stages", "errors", "process", "progress", "priors", "fine_tune", "samples", "super_resolution",
                     "baseline", "generation", "watermark", "images", "storage", "archives"}


def layer_of(module: str) -> int:
    name = module.removeprefix("dreambooth").removeprefix(".")
    matches = [(len(prefix), depth) for depth, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".") or (prefix == "" and name == "")]
    assert matches, f"{module} is in no layer of LAYERS: add it where it belongs"
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module in a higher layer: 'importer -> imported (layer -> layer)'."""
    found = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) < layer_of(importer):
                found.append(f"{importer} -> {target} ({LAYERS[layer_of(importer)][0]} -> {LAYERS[layer_of(target)][0]})")
    return found


def test_imports_run_downhill_from_commands_to_shared_machinery():
    graph = import_graph()
    assert graph["dreambooth.dag.pipeline"] and graph["dreambooth.cli"], "the graph was read"
    assert upward_imports(graph) == []


def test_an_import_up_a_layer_is_found_even_inside_a_function(tmp_path):
    graph = import_graph()
    graph["dreambooth.models.loading"] = graph["dreambooth.models.loading"] | {"dreambooth.evaluation.encoders"}
    assert upward_imports(graph) == ["dreambooth.models.loading -> dreambooth.evaluation.encoders (models -> stages)"]
    planted = PACKAGE / "models" / "_planted_for_test.py"
    try:
        planted.write_text("def f():\n    from dreambooth.dag.pipeline import build_pipeline\n")
        assert upward_imports(import_graph()) == ["dreambooth.models._planted_for_test -> dreambooth.dag.pipeline (models -> dag)"]
    finally:
        planted.unlink()


def test_the_package_top_holds_only_the_entry_points_the_basics_and_the_stages():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == TOP_LEVEL_MODULES
    for package in [path.parent for path in PACKAGE.rglob("__init__.py")]:
        docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert docstring, f"{package.relative_to(REPO)}/__init__.py says what lives there"


_IMPORT_EVERY_MODULE = """
import importlib, logging, os, pkgutil, signal
import accelerate, diffusers, kfp, mlflow, peft, torch, transformers  # their own import-time settings are theirs

def process_wide():
    root = logging.getLogger()
    return dict(os.environ), list(root.handlers), root.level, signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)

import dreambooth
before = process_wide()
modules = [found.name for found in pkgutil.walk_packages(dreambooth.__path__, "dreambooth.")]
for name in modules:
    importlib.import_module(name)
after = process_wide()
changed = [label for label, old, new in zip(("environment", "log handlers", "log level", "SIGTERM", "SIGALRM"), before, after) if old != new]
print(len(modules), changed)
"""


def test_importing_every_module_changes_nothing_process_wide():
    """Settings belong to dreambooth.process.configure_process, called where a process starts."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_MODULE], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    count, changed = result.stdout.split(" ", 1)
    assert int(count) > 50 and changed.strip() == "[]"


LAYOUT = PACKAGE / "tracking" / "layout.py"
STORE = PACKAGE / "tracking" / "store.py"
TAG = re.compile(r"^(dreambooth|kfp|mlflow)\.[a-zA-Z_]+$")
NOT_TAGS = {"dreambooth.json", "dreambooth.yaml", "mlflow.db", "dreambooth.batch_finished"}  # file names, the webhook event


def layout_written_outside(paths: list[Path]) -> list[str]:
    """Tag names, run searches and MLflow clients made anywhere but the layout module and the store."""
    modules = set(import_graph())
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if path != LAYOUT and TAG.match(node.value) and node.value not in NOT_TAGS | modules:
                    found.append(f"{where} tag {node.value!r}")
                if path != LAYOUT and "tags.`" in node.value:
                    found.append(f"{where} search filter")
            elif isinstance(node, ast.Attribute) and node.attr == "search_runs" and path != LAYOUT:
                found.append(f"{where} search_runs")
            elif isinstance(node, (ast.Name, ast.alias)) and "MlflowClient" in (getattr(node, "id", None), getattr(node, "name", None)) \
                    and path != STORE:
                found.append(f"{where} MlflowClient")
    return found


def test_the_run_layout_and_the_client_have_one_home_each():
    assert layout_written_outside(sorted([*PACKAGE.rglob("*.py"), *(REPO / "bench").glob("*.py")])) == []


def test_a_tag_a_search_or_a_client_written_elsewhere_is_found(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from mlflow.tracking import MlflowClient\n"
                       "def f(c): return c.search_runs(['1'], f\"tags.`dreambooth.stage` = 'x'\", {'dreambooth.gate': 1})\n")
    kinds = sorted(line.split(" ")[1] for line in layout_written_outside([planted]))
    assert kinds == ["MlflowClient", "search", "search_runs", "tag"]
