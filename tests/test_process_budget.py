"""The suite's process budget (tests/process_budget.py): the processes a test starts are counted by the
ledger hook each of them loads, and a test file that starts more than its budget is named."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

from tests import process_budget


def _start(ledger, test: str, *arguments: str) -> None:
    env = {**os.environ, "DREAMBOOTH_TEST_LEDGER": str(ledger), "PYTEST_CURRENT_TEST": f"{test} (call)",
           "PYTHONPATH": os.pathsep.join([str(process_budget.LEDGER_FOLDER), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, *arguments], env=env, check=True, timeout=120)


def test_a_process_that_imports_torch_and_a_pipelines_exit_handler_are_each_counted_once(tmp_path):
    _start(tmp_path, "tests/a/test_x.py::test_one", "-c", "import torch, torch.nn")
    _start(tmp_path, "tests/a/test_x.py::test_one", "-c", "import json")
    # the exit-handler task of a pipeline run, as kfp's executor starts it (its own module is not needed to count it)
    _start(tmp_path, "tests/b/test_y.py::test_two", "-c", "pass", "--function_to_execute", "finish_tracking")
    _start(tmp_path, "tests/b/test_y.py::test_two", "-c", "pass", "--function_to_execute", "fine_tune")
    per_test = process_budget.read_ledger(tmp_path)
    assert per_test == {"tests/a/test_x.py::test_one": Counter(torch=1), "tests/b/test_y.py::test_two": Counter(pipeline=1)}


def test_a_file_over_its_budget_is_named_with_the_tests_that_started_the_processes():
    per_test = {"tests/dag/test_p.py::test_a": Counter(pipeline=2, torch=9), "tests/dag/test_p.py::test_b": Counter(pipeline=1, torch=3),
                "tests/test_q.py::test_c": Counter(torch=1)}
    budget = process_budget.as_budget({"tests/dag/test_p.py::test_a": Counter(pipeline=2, torch=12), "tests/test_q.py::test_c": Counter(torch=1)})
    assert budget == {"total": {"pipeline": 2, "torch": 13}, "files": {"tests/dag/test_p.py": {"pipeline": 2, "torch": 12},
                                                                        "tests/test_q.py": {"torch": 1}}}
    assert process_budget.over_budget(per_test, budget) == [
        "tests/dag/test_p.py: 3 pipeline processes, budget 2: started by test_a (2), test_b (1)",
        "the whole run: 3 pipeline processes, budget 2",
    ]
    new_file = {**per_test, "tests/test_new.py::test_d": Counter(torch=1)}
    assert process_budget.over_budget(new_file, budget) == [
        "tests/dag/test_p.py: 3 pipeline processes, budget 2: started by test_a (2), test_b (1)",
        "tests/test_new.py: 1 torch processes, budget 0: started by test_d (1)",
        "the whole run: 3 pipeline processes, budget 2",
        "the whole run: 14 torch processes, budget 13",
    ]


def test_a_scoped_fixture_counts_once_however_many_workers_set_it_up(tmp_path):
    """A module fixture set up on both workers (the scheduling's choice) and a session fixture: each counts as one setup."""
    lines = [("torch", "tests/test_c.py::test_one", "module:compiled:gw0-3"), ("torch", "tests/test_c.py::test_one", "module:compiled:gw0-3"),
             ("torch", "tests/test_c.py::test_two", "module:compiled:gw1-7"), ("torch", "tests/test_c.py::test_two", "module:compiled:gw1-7"),
             ("torch", "tests/test_c.py::test_two", ""),
             ("pipeline", "tests/dag/test_d.py::test_x", "session:batch:gw1-2"), ("pipeline", "tests/test_e.py::test_y", "session:batch:gw0-9")]
    for index, line in enumerate(lines):
        (tmp_path / f"line-{index}").write_text("\t".join(line) + "\n")
    per_test = process_budget.read_ledger(tmp_path)
    assert process_budget.by_file(per_test) == {"tests/test_c.py": Counter(torch=3), "session fixture batch": Counter(pipeline=1)}


def test_the_ledger_counts_the_task_the_dag_runs_once_as_its_exit_handler(tmp_path):
    """The exit handler (the one task that runs whatever happened upstream) executes the function the ledger counts
    as a pipeline run, and no other task does: a renamed component would otherwise go uncounted."""
    import runpy

    import yaml

    from dreambooth.config import load_config
    from dreambooth.dag.kfp_runs import compile_dag

    counted = runpy.run_path(str(process_budget.LEDGER_FOLDER / "sitecustomize.py"))["EXIT_HANDLER"]
    spec = yaml.safe_load(compile_dag(load_config("tiny"), tmp_path / "dag.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]

    def function_of(executor: str) -> str:
        arguments = executors[executor]["container"]["args"]
        return arguments[arguments.index("--function_to_execute") + 1]

    (exit_handler,) = [task for task in spec["root"]["dag"]["tasks"].values() if "triggerPolicy" in task]
    assert function_of(exit_handler["componentRef"]["name"].replace("comp-", "exec-", 1)) == counted
    assert [executor for executor in executors if function_of(executor) == counted] == ["exec-finish-tracking"]
