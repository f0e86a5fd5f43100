"""The suite's process budget: what one `make test` (or `make test-fast`) may start, counted, not timed.

Whole-pipeline runs (kfp.local pipeline executions) and other processes that import torch are what make the
suite slow on two cores. tests/process_ledger/sitecustomize.py records each one with the test that started
it; at the end of the session this module counts them per test file against tests/process_budget.json and
fails the run when a file or the total starts more than its budget, naming the tests that started them.
The budget only rises in a commit that says why (`--process-budget-write` rewrites it from a run).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

BUDGET_FILE = Path(__file__).with_name("process_budget.json")
LEDGER_FOLDER = Path(__file__).with_name("process_ledger")
KINDS = ("pipeline", "torch")


def start_ledger() -> None:
    """Called once, by the first pytest process: every process started from here on inherits the ledger."""
    if "DREAMBOOTH_TEST_LEDGER" not in os.environ:
        os.environ["DREAMBOOTH_TEST_LEDGER"] = tempfile.mkdtemp(prefix="dreambooth-ledger-")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LEDGER_FOLDER), os.environ.get("PYTHONPATH")]))


class FixtureSetups:
    """A module- or session-scoped fixture's setup names itself to the processes it starts
    (DREAMBOOTH_TEST_FIXTURE), so they count once, whichever workers set it up."""

    def __init__(self) -> None:
        self.setups = 0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        if fixturedef.scope == "function":
            yield
            return
        outer = os.environ.get("DREAMBOOTH_TEST_FIXTURE")
        self.setups += 1
        os.environ["DREAMBOOTH_TEST_FIXTURE"] = f"{fixturedef.scope}:{fixturedef.argname}:{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{self.setups}"
        try:
            yield
        finally:
            if outer is None:
                os.environ.pop("DREAMBOOTH_TEST_FIXTURE", None)
            else:
                os.environ["DREAMBOOTH_TEST_FIXTURE"] = outer


def read_ledger(folder: Path) -> dict[str, Counter]:
    """{test id: Counter({kind: count})}: what each test started, read from the ledger's lines.

    A module- or session-scoped fixture is set up once per xdist worker that needs it (and again when a worker
    comes back to its module), which the scheduling decides: its processes count once, as one setup's, under
    the test file that defines the fixture's scope (a session fixture: `session fixture NAME`)."""
    per_test: dict[str, Counter] = defaultdict(Counter)
    setups: dict[tuple[str, str], dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for line_file in folder.iterdir():
        kind, test, fixture = (line_file.read_text().rstrip("\n").split("\t") + [""])[:3]
        if not fixture:
            per_test[test][kind] += 1
            continue
        scope, name, instance = fixture.split(":", 2)
        owner = f"session fixture {name}" if scope == "session" else f"{test.split('::', 1)[0]}::{name} (a {scope} fixture)"
        setups[owner, name][instance][kind] += 1
    for (owner, _), instances in setups.items():
        per_test[owner].update({kind: max(counts[kind] for counts in instances.values()) for kind in KINDS})
    return per_test


def by_file(per_test: dict[str, Counter]) -> dict[str, Counter]:
    files: dict[str, Counter] = defaultdict(Counter)
    for test, counts in per_test.items():
        files[test.split("::", 1)[0]].update(+counts)
    return files


def over_budget(per_test: dict[str, Counter], budget: dict) -> list[str]:
    """One line per test file (and for the total) that started more than its budget, naming its tests."""
    lines = []
    files = by_file(per_test)
    for file, counts in sorted(files.items()):
        allowed = budget.get("files", {}).get(file, {})
        for kind in KINDS:
            if counts[kind] > allowed.get(kind, 0):
                starters = ", ".join(f"{test.split('::', 1)[1]} ({n[kind]})" for test, n in sorted(per_test.items())
                                     if test.startswith(file + "::") and n[kind]) or file  # a session fixture
                lines.append(f"{file}: {counts[kind]} {kind} processes, budget {allowed.get(kind, 0)}: started by {starters}")
    total = sum(files.values(), Counter())
    for kind in KINDS:
        if total[kind] > budget.get("total", {}).get(kind, 0):
            lines.append(f"the whole run: {total[kind]} {kind} processes, budget {budget.get('total', {}).get(kind, 0)}")
    return lines


def as_budget(per_test: dict[str, Counter]) -> dict:
    files = by_file(per_test)
    total = sum(files.values(), Counter())
    return {"total": {kind: total[kind] for kind in KINDS},
            "files": {file: {kind: counts[kind] for kind in KINDS if counts[kind]} for file, counts in sorted(files.items())}}
