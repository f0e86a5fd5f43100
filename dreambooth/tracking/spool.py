"""Step metrics that survive a tracking outage and a killed process.

Each point is appended to a local journal first (`<run id>.jsonl` in the spool folder, on the work
disk), and a background thread sends what is new in batches, writing how far it got to
`<run id>.sent`. Training never waits on the server: while it is away the journal grows, and it is
sent when the server is back, by this process, by a retried task that reopens the run, or by
`dreambooth sync-tracking`. Points keep the timestamp they were made with and MLflow stores an
exact duplicate once, so a batch sent twice (a kill between the send and the offset write) is
still logged once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

JOURNAL_SUFFIX, OFFSET_SUFFIX, INFO_SUFFIX = ".jsonl", ".sent", ".json"
SEND_EVERY_SECONDS = 5.0
SEND_BATCH = 1000  # MLflow's log_batch limit on metrics
RETRY_SECONDS = (2.0, 5.0, 15.0, 30.0)


def _paths(folder: Path, run_id: str) -> tuple[Path, Path, Path]:
    return folder / f"{run_id}{JOURNAL_SUFFIX}", folder / f"{run_id}{OFFSET_SUFFIX}", folder / f"{run_id}{INFO_SUFFIX}"


def _sent_offset(offset_file: Path) -> int:
    try:
        return int(offset_file.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _unsent_lines(journal: Path, offset: int) -> list[bytes]:
    """The complete lines after `offset` (a half-written last line waits for its end)."""
    try:
        with journal.open("rb") as source:
            source.seek(offset)
            data = source.read()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].splitlines()


def send_pending(client, run_id: str, folder: Path) -> int:
    """Send what the journal holds beyond its offset; returns the points sent. Raises if the server fails."""
    from mlflow.entities import Metric

    journal, offset_file, _ = _paths(folder, run_id)
    offset = _sent_offset(offset_file)
    lines = _unsent_lines(journal, offset)
    for start in range(0, len(lines), SEND_BATCH):
        chunk = lines[start : start + SEND_BATCH]
        points = [json.loads(line) for line in chunk]
        client.log_batch(run_id, metrics=[Metric(p["key"], p["value"], p["time"], p["step"]) for p in points])
        offset += sum(len(line) + 1 for line in chunk)
        offset_file.write_text(str(offset))  # after the send: a kill in between resends, which MLflow absorbs
    return len(lines)


def unsent_points(folder: Path, run_id: str) -> int:
    journal, offset_file, _ = _paths(folder, run_id)
    return len(_unsent_lines(journal, _sent_offset(offset_file)))


def discard(folder: Path, run_id: str) -> None:
    for path in _paths(folder, run_id):
        path.unlink(missing_ok=True)


class MetricSpool:
    """One run's step metrics: `add` appends to the journal and returns; a thread sends them."""

    def __init__(self, client, tracking_uri: str, run_id: str, folder: Path):
        self.client, self.run_id, self.folder = client, run_id, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.journal, _, info = _paths(folder, run_id)
        info.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}))
        # A reopened run (a retried task) continues its journal: steps an interrupted attempt
        # logged after its last checkpoint are computed again, but logged once.
        self.last_step = max((json.loads(line)["step"] for line in _unsent_lines(self.journal, 0)), default=0)
        self._file = self.journal.open("a")
        fcntl.flock(self._file, fcntl.LOCK_EX)  # held while this process writes: `sync-tracking` leaves the journal alone
        self._wake, self._closing = threading.Event(), threading.Event()
        self.last_error: Optional[str] = None
        self._thread = threading.Thread(target=self._send_loop, name=f"metric-spool-{run_id[:8]}", daemon=True)
        self._thread.start()

    def add(self, step: int, values: dict[str, float]) -> None:
        if step <= self.last_step:
            return
        now = int(time.time() * 1000)
        lines = "".join(json.dumps({"key": k, "value": float(v), "time": now, "step": step}) + "\n" for k, v in values.items())
        self._file.write(lines)  # one write per step, so a kill leaves whole lines behind
        self._file.flush()
        self.last_step = step

    def _send_loop(self) -> None:
        failures = 0
        while True:
            delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)] if failures else SEND_EVERY_SECONDS
            self._wake.wait(delay)
            self._wake.clear()
            closing = self._closing.is_set()
            try:
                send_pending(self.client, self.run_id, self.folder)
                failures, self.last_error = 0, None
            except Exception as error:  # the server is away: the journal keeps everything
                failures += 1
                self.last_error = (str(error).splitlines() or [type(error).__name__])[0]
                if failures == 1:
                    log.warning("tracking unreachable, step metrics kept in %s: %s", self.journal, self.last_error)
                continue
            if closing:
                return

    def close(self, timeout: float) -> int:
        """Send what is left, waiting at most `timeout` seconds; returns the points still unsent
        (0: everything is in MLflow and the journal is gone; else the journal stays for a later send)."""
        self._file.close()
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)
        left = unsent_points(self.folder, self.run_id)
        if left == 0 and not self._thread.is_alive():
            discard(self.folder, self.run_id)
        return left


def _being_written(folder: Path, run_id: str) -> bool:
    journal = _paths(folder, run_id)[0]
    if not journal.is_file():
        return False
    with journal.open("a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
    return False


@dataclass(frozen=True)
class SyncOutcome:
    run_id: str
    sent: int
    error: Optional[str] = None


def sync_spooled(folder: Path, tracking_uri: Optional[str] = None) -> list[SyncOutcome]:
    """Send every journal left in `folder` (all of them, or those of `tracking_uri`); sent journals are removed."""
    from dreambooth.tracking.store import client

    outcomes = []
    for info_file in sorted(folder.glob(f"*{INFO_SUFFIX}")) if folder.is_dir() else []:
        info = json.loads(info_file.read_text())
        if (tracking_uri and info["tracking_uri"] != tracking_uri) or _being_written(folder, info["run_id"]):
            continue
        try:
            sent = send_pending(client(info["tracking_uri"]), info["run_id"], folder)
        except Exception as error:
            outcomes.append(SyncOutcome(info["run_id"], 0, (str(error).splitlines() or [type(error).__name__])[0]))
            continue
        discard(folder, info["run_id"])
        outcomes.append(SyncOutcome(info["run_id"], sent))
    return outcomes
