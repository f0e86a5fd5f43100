"""Loaded at start-up by every Python process the test suite starts (tests/conftest.py puts this folder
first on PYTHONPATH): it writes one line to the suite's ledger for a process that imports torch, and one
for a whole-pipeline run (the exit-handler task every pipeline of ours runs once), each with the test that
started it (PYTEST_CURRENT_TEST, inherited) and, when a module- or session-scoped fixture's setup started it, that
setup (DREAMBOOTH_TEST_FIXTURE, set by tests/conftest.py). tests/process_budget.py counts the lines.
"""

import os
import sys

_LEDGER = os.environ.get("DREAMBOOTH_TEST_LEDGER")
EXIT_HANDLER = "finish_tracking"  # dreambooth.dag.components.finish_tracking: once per pipeline run


def _record(kind: str) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    if not test:  # pytest itself and its workers: the suite's own processes, not ones a test started
        return
    with open(os.path.join(_LEDGER, f"{kind}-{os.getpid()}"), "w") as line:
        line.write(f"{kind}\t{test}\t{os.environ.get('DREAMBOOTH_TEST_FIXTURE', '')}\n")


class _TorchImportWatch:
    """A finder that finds nothing: it notes the first import of torch and steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            _record("torch")
        return None


if _LEDGER and os.path.isdir(_LEDGER):
    sys.meta_path.insert(0, _TorchImportWatch())
    arguments = sys.argv[1:]
    if "--function_to_execute" in arguments and arguments[arguments.index("--function_to_execute") + 1:][:1] == [EXIT_HANDLER]:
        _record("pipeline")
