"""What the local run knows of kfp.local beyond its public calls, in one place.

kfp.local reports a task's start, its executor's start and its end only as log text, and a failed
task only in its RuntimeError's message; it also swaps `builtins.print` to indent task output.
Everything that depends on that wording is here; tests/commands/test_kfp_local.py runs real local
pipelines and fails when kfp changes it.
"""

from __future__ import annotations

import builtins
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_STARTED = re.compile(r"Executing task '([^']+)'")
_EXECUTOR_STARTED = re.compile(r"Looking for component `([^`]+)`")
_TASK_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_TASK_FAILED = re.compile(r"Inner task failed: (.+)\.$")
_SAME_COMPONENT_AGAIN = re.compile(r"-\d+$")


# Lines of a task's output that are not the stage's own: kfp.local's logger and its executor's (task status,
# "Wrote executor output"), and library INFO/DEBUG logging (MLflow's system-metrics monitor), which would
# crowd a failure's tail and end it with "finished with status SUCCESS".
_NOT_THE_STAGES_OWN = re.compile(
    r"^\s*(?:$"
    r"|\d\d:\d\d:\d\d\.\d+ - (?:INFO|DEBUG) - "
    r"|\[KFP Executor [^\]]* (?:INFO|DEBUG)\]"
    r"|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:INFO|DEBUG) )"
)


def stages_own(line: str) -> bool:
    """Whether a line of a task's output is the stage's own (its progress, errors, prints, warnings)."""
    return not _NOT_THE_STAGES_OWN.match(line)


def plain(line: str) -> str:
    """The line without kfp's colours."""
    return _ANSI.sub("", line).rstrip()


def started_task(line: str) -> Optional[str]:
    """kfp's own line as a task starts: the task's name (`summarize-2` for a component's second task)."""
    found = _TASK_STARTED.search(line)
    return found.group(1) if found else None


def component_of(task: str) -> str:
    """The component a task runs: kfp names a component's second task `summarize-2`."""
    return _SAME_COMPONENT_AGAIN.sub("", task)


def started_component(line: str) -> Optional[str]:
    """The task process's first line (kfp's executor): the component's name, `fine-tune`."""
    found = _EXECUTOR_STARTED.search(line)
    return found.group(1).replace("_", "-") if found else None


def finished_task(line: str) -> Optional[str]:
    found = _TASK_FINISHED.search(line)
    return found.group(1) if found else None


def failed_task_chain(message: str) -> Optional[str]:
    """From kfp.local's failure report, the failed task and the groups around it
    ("batch-failures inside exit-handler-1"); None when the error is not a task failure."""
    found = _TASK_FAILED.search(plain(message).strip())
    return found.group(1).replace("'", "") if found else None


class LocalRuns:
    """Pipelines run here through kfp.local, each task a subprocess of this environment."""

    def __init__(self, pipeline_root: Path, pipeline_name: str):
        self.pipeline_root, self.pipeline_name = pipeline_root, pipeline_name
        self._before = set(self._job_folders())

    def _job_folders(self) -> list[Path]:
        # kfp.local writes a run's outputs to {pipeline_root}/{pipeline name}-{timestamp}/{task}/{output}.
        return [path for path in self.pipeline_root.glob(f"{self.pipeline_name}-*") if path.is_dir()]

    def job_folder(self) -> Optional[Path]:
        """The folder of the run started since, once kfp.local has made it."""
        created = [path for path in self._job_folders() if path not in self._before]
        return max(created, key=lambda path: path.stat().st_mtime) if created else None

    def run(self, pipeline: Callable, arguments: dict) -> Optional[str]:
        """None, or the failed task's chain when a task failed (any other error is raised)."""
        try:
            pipeline(**arguments)
        except RuntimeError as error:
            chain = failed_task_chain(str(error))
            if chain is None:
                raise
            return chain
        return None


@contextmanager
def local_pipelines(pipeline_root: Path, pipeline_name: str) -> Iterator[LocalRuns]:
    """kfp.local set up to run pipelines here, with outputs under pipeline_root."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    print_function = builtins.print
    try:
        yield LocalRuns(pipeline_root, pipeline_name)
    finally:
        # kfp.local indents task output by swapping builtins.print, and parallel tasks can leave it swapped.
        builtins.print = print_function
