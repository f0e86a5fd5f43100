"""What `dreambooth run` shows: one line per stage, and each task's whole log in a file.

kfp.local runs every task as a subprocess and prints its output from the thread that runs the
task (loop iterations share a thread pool). While the pipeline runs, sys.stdout and sys.stderr
are a TaskOutput that knows which task each thread is on: each line lands in that task's log
under `{job}/logs/`, the whole stream in `{job}/logs/pipeline.log`, and the tasks' `[progress]`
lines (dreambooth.progress) move a Board of stage rows. On a terminal a line per subject (the
stage it is on) redraws in place (rich); in a log file or CI each state change is one plain
line, progress at most every 30 s. `--verbose` echoes the whole stream as well.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TextIO

from dreambooth.commands.kfp_local import component_of, finished_task, plain, stages_own, started_component, started_task
from dreambooth.progress import DONE, FAILED, RUNNING, SKIPPED, ProgressEvent, parse
from dreambooth.stages import BY_NAME, CLASS_PRIORS, PLAN_BATCH, SUBJECT_STAGES, SUMMARIZE, SUPERRES_STAGES

WAITING = "waiting"
BATCH = "batch"
TAIL_LINES = 15
PLAIN_PROGRESS_SECONDS = 30.0


@dataclass
class Row:
    scope: str
    stage: str
    state: str = WAITING
    started: Optional[float] = None
    ended: Optional[float] = None
    progress: Optional[ProgressEvent] = None
    printed: float = 0.0  # when the plain view last printed this row's progress

    def elapsed(self) -> str:
        if self.started is None:
            return ""
        seconds = int((self.ended or time.monotonic()) - self.started)
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

    def how_far(self) -> str:
        return self.progress.counted() if self.progress else ""


def planned_rows(subjects: list[str], class_nouns: list[str], superres: bool) -> list[Row]:
    """The rows a run starts with, all waiting: the plan, each class's priors, each subject's stages."""
    rows = [Row(BATCH, PLAN_BATCH.name)] + [Row(f"class:{noun}", CLASS_PRIORS.name) for noun in dict.fromkeys(class_nouns)]
    for subject in subjects:
        rows += [Row(subject, stage.name) for stage in SUBJECT_STAGES + (SUPERRES_STAGES if superres else ())]
    return rows + [Row(BATCH, SUMMARIZE.name)]


class Board:
    """Stage rows and their states; a view is told of every change."""

    def __init__(self, rows: list[Row], view: "View"):
        self.rows = {(row.scope, row.stage): row for row in rows}
        self.view = view
        self._lock = threading.Lock()

    def row(self, scope: str, stage: str) -> Row:
        key = (scope, stage)
        if key not in self.rows:
            self.rows[key] = Row(scope, stage)
        return self.rows[key]

    def apply(self, event: ProgressEvent) -> Row:
        with self._lock:
            row = self.row(event.scope, event.stage)
            now = time.monotonic()
            if event.state == RUNNING and event.total is not None:
                row.progress = event
                self.view.progressed(row)
                return row
            if event.state == RUNNING and row.state == RUNNING:
                return row  # a retry in the same task: still the same stage
            row.state = event.state
            if event.state == RUNNING:
                row.started, row.ended = now, None
            else:
                row.ended = now
                if row.started is None and event.state != SKIPPED:
                    row.started = now
            if event.detail and event.state in (FAILED, SKIPPED):
                row.progress = ProgressEvent(row.scope, row.stage, event.state, detail=event.detail)
            self.view.changed(row)
            return row

    def close(self) -> None:
        """The pipeline ended: what never ran was skipped; what never ended failed."""
        for row in list(self.rows.values()):
            if row.state == WAITING:
                self.apply(ProgressEvent(row.scope, row.stage, SKIPPED))
            elif row.state == RUNNING:
                self.apply(ProgressEvent(row.scope, row.stage, FAILED, detail="ended without finishing"))


class View:
    def changed(self, row: Row) -> None: ...
    def progressed(self, row: Row) -> None: ...
    def failure(self, row: Row, tail: list[str], log: Optional[Path]) -> None: ...
    def start(self, board: Board) -> None: ...
    def stop(self) -> None: ...


def _columns(row: Row, state: str) -> str:
    return f"{time.strftime('%H:%M:%S')}  {row.scope:<16} {row.stage:<18} {state:<8} {row.elapsed():>7}  {row.how_far()}".rstrip()


def _failure_lines(row: Row, tail: list[str], log: Optional[Path]) -> list[str]:
    lines = [f"--- {row.scope} {row.stage} failed; the last lines of its log:"]
    lines += [f"    {line}" for line in tail]
    if log is not None:
        lines.append(f"--- full log: {log}")
    return lines


class PlainView(View):
    """For log files and CI: a line per state change, a progress line per stage at most every 30 s."""

    def __init__(self, out: TextIO):
        self.out = out

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def changed(self, row: Row) -> None:
        self._print(_columns(row, row.state))

    def progressed(self, row: Row) -> None:
        now = time.monotonic()
        if now - row.printed >= PLAIN_PROGRESS_SECONDS:
            row.printed = now
            self._print(_columns(row, ""))

    def failure(self, row: Row, tail: list[str], log: Optional[Path]) -> None:
        for line in _failure_lines(row, tail, log):
            self._print(line)


def current_rows(rows: list[Row]) -> list[tuple[Row, str]]:
    """One row per subject (and for the batch, and each class's priors): the stage it is on, or the
    one it failed at, or its last; with how many of its stages have ended."""
    by_scope: dict[str, list[Row]] = {}
    for row in rows:
        by_scope.setdefault(row.scope, []).append(row)
    shown = []
    for scope_rows in by_scope.values():
        ended = sum(row.state in (DONE, FAILED, SKIPPED) for row in scope_rows)
        current = (next((row for row in scope_rows if row.state == RUNNING), None)
                   or next((row for row in scope_rows if row.state == FAILED), None)
                   or next((row for row in scope_rows if row.state == WAITING), None)
                   or next((row for row in reversed(scope_rows) if row.state == DONE), scope_rows[-1]))
        shown.append((current, f"{ended}/{len(scope_rows)}"))
    return shown


class LiveView(View):
    """For a terminal: a line per subject, redrawn in place four times a second."""

    STYLES = {WAITING: "dim", RUNNING: "bold cyan", DONE: "green", FAILED: "bold red", SKIPPED: "yellow"}

    def __init__(self, out: TextIO):
        from rich.console import Console

        self.console = Console(file=out)
        self.board: Optional[Board] = None
        self.live = None

    def _table(self):
        from rich.table import Table

        table = Table(box=None, pad_edge=False, show_header=False)
        for _ in range(6):
            table.add_column(no_wrap=True)
        for row, stages in current_rows(list(self.board.rows.values())):
            table.add_row(row.scope, stages, row.stage, f"[{self.STYLES[row.state]}]{row.state}", row.elapsed(), row.how_far())
        return table

    def start(self, board: Board) -> None:
        from rich.live import Live

        self.board = board
        self.live = Live(get_renderable=self._table, console=self.console, refresh_per_second=4)
        self.live.start()

    def failure(self, row: Row, tail: list[str], log: Optional[Path]) -> None:
        for line in _failure_lines(row, tail, log):
            self.console.print(line, markup=False, highlight=False)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


@dataclass
class TaskLog:
    """One task's output: kept in memory until the job folder exists, then in its file."""

    task: str
    scope: str = ""
    stage: str = ""
    path: Optional[Path] = None
    failed: bool = False
    pending: list[str] = field(default_factory=list)
    tail: deque = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    executor_seen: bool = False
    own_output: bool = False  # the stage's code has printed (its first progress line)
    _file: Optional[TextIO] = None

    @property
    def component(self) -> str:
        """The stage the task runs."""
        return component_of(self.task)

    def add(self, line: str, own_output_starts: bool = False) -> None:
        """A line of the task's output, to its log; to the tail shown on failure only the stage's own lines,
        from its first progress line on (before it: kfp.local's executor input and start-up)."""
        if own_output_starts and not self.own_output:
            self.own_output = True
            self.tail.clear()
        if stages_own(line):
            self.tail.append(line)
        if self._file is None:
            self.pending.append(line)
        else:
            self._file.write(line + "\n")

    def settle(self, path: Path) -> None:
        """Give the log its file, once the job folder and (where there is one) the subject are known."""
        if self.path is not None:
            return
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)  # line-buffered: the file is current while the task runs
        self._file.writelines(line + "\n" for line in self.pending)
        self.pending.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TaskOutput(io.TextIOBase):
    """sys.stdout / sys.stderr while the pipeline runs: each thread's lines to its task's log."""

    def __init__(self, find_job_dir: Callable[[], Optional[Path]], board: Optional[Board], echo: Optional[TextIO]):
        self.find_job_dir = find_job_dir
        self.board = board
        self.echo = echo
        self.logs_dir: Optional[Path] = None
        self.pipeline_log = TaskLog("pipeline")
        self.failed_logs: list[TaskLog] = []
        self._current: dict[int, TaskLog] = {}
        self._partial: dict[int, str] = {}
        self._ended_early: list[TaskLog] = []  # tasks that ended before the job folder existed
        self._lock = threading.RLock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            if self.echo is not None:
                self.echo.write(text)
            thread = threading.get_ident()
            buffered = self._partial.pop(thread, "") + text
            *lines, rest = buffered.split("\n")
            if rest:
                self._partial[thread] = rest
            for line in lines:
                self._line(thread, line)
        return len(text)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()

    def _logs_dir(self) -> Optional[Path]:
        if self.logs_dir is None:
            job_dir = self.find_job_dir()
            if job_dir is not None:
                self.logs_dir = job_dir / "logs"
                self.pipeline_log.settle(self.logs_dir / "pipeline.log")
                ended, self._ended_early = self._ended_early, []
                for task in ended:
                    self._settle(task)
                    task.close()
                    self._report_end(task)
        return self.logs_dir

    def _settle(self, task: TaskLog) -> None:
        logs_dir = self._logs_dir()
        if logs_dir is not None:
            task.settle(BY_NAME[task.component].log_file(logs_dir, task.scope or BATCH))

    def _starts_task(self, thread: int, line: str) -> None:
        # Where a task's output begins and ends. kfp.local's own lines go through the root logger, which
        # its parallel threads reconfigure under each other, so one can be lost: a task also begins at its
        # executor's first line (printed by the task's own process), and ends where the next one begins.
        started, component = started_task(line), started_component(line)
        current = self._current.get(thread)
        if started:
            self._end_task(thread)
            self._current[thread] = TaskLog(started)
        elif component:
            if current is None or current.executor_seen or current.component != component:
                self._end_task(thread)  # kfp's line for this task was lost
                self._current[thread] = TaskLog(component)
            self._current[thread].executor_seen = True

    def _line(self, thread: int, line: str) -> None:
        line = plain(line)
        self._starts_task(thread, line)
        task = self._current.get(thread)
        self.pipeline_log.add(line)
        if task is not None:
            event = parse(line)
            task.add(line, own_output_starts=event is not None)
            if event is not None:
                task.scope, task.stage = event.scope, event.stage
                row = self.board.apply(event) if self.board else None
                task.failed = task.failed or (row is not None and event.state == FAILED)
        if task is not None and task.scope:
            self._settle(task)
        else:
            self._logs_dir()
        if finished_task(line):
            self._end_task(thread)

    def _end_task(self, thread: int) -> None:
        """A task's output ended. Its stage said done, failed or skipped itself; one still running
        at its end died without a word (a crash, a kill), and failed."""
        task = self._current.pop(thread, None)
        if task is None:
            return
        if self.board is not None and task.scope and task.stage and self.board.row(task.scope, task.stage).state == RUNNING:
            self.board.apply(ProgressEvent(task.scope, task.stage, FAILED, detail="the task ended without finishing"))
            task.failed = True
        self._settle(task)
        task.close()
        if task.path is None:
            self._ended_early.append(task)  # its lines, and a failure's report, wait for the job folder
        else:
            self._report_end(task)

    def _report_end(self, task: TaskLog) -> None:
        if task.failed:
            self.failed_logs.append(task)
            self.board.view.failure(self.board.row(task.scope, task.stage), list(task.tail), task.path)

    def close(self) -> None:
        """The pipeline returned: partial lines out, open tasks ended (they failed), logs written."""
        with self._lock:
            for thread, rest in list(self._partial.items()):
                self._line(thread, rest)
            self._partial.clear()
            for thread in list(self._current):
                self._end_task(thread)
            self._logs_dir()
            for task in self._ended_early:  # no job folder ever appeared: report them without a log file
                self._report_end(task)
            self._ended_early.clear()
            self.pipeline_log.close()

    def log_of(self, task: str) -> Optional[Path]:
        """The log of the last failed run of `task` (kfp's name for it)."""
        return next((log.path for log in reversed(self.failed_logs) if log.task == task), None)


class RunConsole:
    """While the pipeline runs: stdout and stderr through a TaskOutput, a view on the real ones."""

    def __init__(self, find_job_dir: Callable[[], Optional[Path]], rows: list[Row], verbose: bool, out: TextIO = None):
        self.out = out or sys.stdout
        self.verbose = verbose
        self.view: Optional[View] = None
        self.board: Optional[Board] = None
        if not verbose:
            self.view = LiveView(self.out) if self.out.isatty() else PlainView(self.out)
            self.board = Board(rows, self.view)
        self.output = TaskOutput(find_job_dir, self.board, self.out if verbose else None)
        self._saved: tuple = ()

    def __enter__(self) -> "RunConsole":
        self._saved = (sys.stdout, sys.stderr)
        if self.view is not None:
            self.view.start(self.board)
        sys.stdout = sys.stderr = self.output
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._saved
        self.output.close()
        if self.board is not None:
            self.board.close()
        if self.view is not None:
            self.view.stop()
