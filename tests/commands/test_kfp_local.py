"""What the local run reads of kfp.local's wording (dreambooth.commands.kfp_local), on a real local pipeline run:
these fail when a kfp release changes a line or the failure report."""

import builtins
import io
import sys

from kfp import dsl

from dreambooth.commands.kfp_local import (
    component_of,
    failed_task_chain,
    finished_task,
    local_pipelines,
    plain,
    started_component,
    started_task,
)


@dsl.component(install_kfp_package=False)
def succeed() -> str:
    return "ok"


@dsl.component(install_kfp_package=False)
def refuse():
    raise ValueError("broken on purpose")


@dsl.pipeline(name="toy")
def toy():
    first = succeed()
    with dsl.ExitHandler(succeed()):  # nested like the product's DAG; the exit task is `succeed-2`
        refuse().after(first)


def test_the_tasks_lines_and_the_failed_task_are_read_from_a_real_local_run(tmp_path):
    printed = io.StringIO()
    saved = sys.stdout, sys.stderr, builtins.print
    sys.stdout = sys.stderr = printed
    try:
        with local_pipelines(tmp_path, "toy") as runs:
            assert runs.job_folder() is None
            failed = runs.run(toy, {})
    finally:
        sys.stdout, sys.stderr, restored = saved[0], saved[1], builtins.print
    assert restored is saved[2]  # kfp.local's print swap undone
    lines = [plain(line) for line in printed.getvalue().splitlines()]

    assert {started_task(line) for line in lines} >= {"succeed", "succeed-2", "refuse"}
    assert {started_component(line) for line in lines} >= {"succeed", "refuse"}
    assert {finished_task(line) for line in lines} >= {"succeed", "succeed-2", "refuse"}
    assert component_of("succeed-2") == "succeed"
    assert failed is not None and failed.split(" inside ")[0] == "refuse"
    assert (runs.job_folder() / "succeed" / "executor_output.json").is_file()  # kfp.local's folder for the run
    assert failed_task_chain("CUDA out of memory") is None  # not a task failure: re-raised as it is
