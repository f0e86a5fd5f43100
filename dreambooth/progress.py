"""Progress lines: where a stage is, as one line a person reads in a pod's log and `run` parses.

    [progress] dog fine-tune running 120/1000 steps · loss 0.1234 · 3.21 steps/s
    [progress] class:dog class-priors done 200/200 images · 61.0 s

A line names who the stage is for (a subject, or `class:<noun>` for a class-prior group), the
stage, its state and, while it runs, how far it is. Tasks print them on stdout: in a container
they are the pod's log; locally `dreambooth run` turns them into its live view.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

PREFIX = "[progress]"
RUNNING, DONE, FAILED, SKIPPED = "running", "done", "failed", "skipped"
STATES = (RUNNING, DONE, FAILED, SKIPPED)
INTERVAL_ENV = "DREAMBOOTH_PROGRESS_SECONDS"  # at most one progress line per stage this often (default 10)
DEFAULT_INTERVAL = 10.0

_LINE = re.compile(
    rf"^{re.escape(PREFIX)} (?P<scope>\S+) (?P<stage>\S+) (?P<state>{'|'.join(STATES)})"
    r"(?: (?P<done>\d+)/(?P<total>\d+) (?P<unit>[\w-]+))?(?: · (?P<detail>.*))?$"
)

OnProgress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class ProgressEvent:
    scope: str
    stage: str
    state: str
    done: Optional[int] = None
    total: Optional[int] = None
    unit: str = ""
    detail: str = ""

    def line(self) -> str:
        count = f" {self.done}/{self.total} {self.unit}" if self.total is not None else ""
        detail = f" · {self.detail}" if self.detail else ""
        return f"{PREFIX} {self.scope} {self.stage} {self.state}{count}{detail}"

    def counted(self) -> str:
        """`step 120/1000 · loss 0.12 · 3.2 steps/s`: how far, for a person."""
        count = f"{self.unit.removesuffix('s')} {self.done}/{self.total}" if self.total is not None else ""
        return " · ".join(part for part in (count, self.detail) if part)


def parse(line: str) -> Optional[ProgressEvent]:
    """The event a line carries; a progress bar's unfinished line may come before it."""
    start = line.rfind(PREFIX)
    found = _LINE.match(line[start:].strip()) if start >= 0 else None
    if found is None:
        return None
    number = lambda key: int(found[key]) if found[key] is not None else None  # noqa: E731
    return ProgressEvent(found["scope"], found["stage"], found["state"], number("done"), number("total"),
                         found["unit"] or "", found["detail"] or "")


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


class StageProgress:
    """One stage's progress lines: its state changes always, its counts at most every interval
    (the first and the last always), with the rate since the previous line."""

    def __init__(self, scope: str, stage: str, emit: Callable[[str], None] = None):
        self.scope, self.stage = scope or "batch", stage
        self._emit = emit or (lambda line: print(line, flush=True))
        self._interval = _interval()
        self._started = time.monotonic()
        self._last: Optional[tuple[float, int]] = None  # (time, done) of the last line printed

    def state(self, state: str, detail: str = "") -> None:
        if state == DONE and not detail:
            detail = f"{time.monotonic() - self._started:.1f} s"
        self._emit(ProgressEvent(self.scope, self.stage, state, detail=detail).line())

    def update(self, done: int, total: int, unit: str, detail: str = "") -> None:
        now = time.monotonic()
        if self._last is not None and done < total and now - self._last[0] < self._interval:
            return
        if self._last is not None and now > self._last[0] and done > self._last[1]:  # the first line: loading, not the rate
            rate = (done - self._last[1]) / (now - self._last[0])
            detail = " · ".join(part for part in (detail, f"{rate:.2f} {unit}/s") if part)
        self._last = (now, done)
        self._emit(ProgressEvent(self.scope, self.stage, RUNNING, done, total, unit, detail).line())


def counter(total: int, on_progress: Optional[OnProgress]) -> Callable[[int], None]:
    """advance(n): n more of `total` done, reported to on_progress (nothing when it is None)."""
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done = min(total, done + count)
        if on_progress is not None and count > 0:
            on_progress(done, total)

    return advance
