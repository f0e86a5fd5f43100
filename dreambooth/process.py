"""How a process of the project is set up: one function, called where a process starts (the
command line, every KFP task, the distributed training workers, the image-drawing workers).
Importing a module of the package changes nothing process-wide."""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal


def configure_process(log_level: int = logging.INFO, stop_on_sigterm: bool = False) -> None:
    """MLflow's client settings, logging, and (for the command line) SIGTERM unwinding like Ctrl-C."""
    # A tracking server that is away fails a call in about a minute instead of MLflow's four (a restart
    # within that minute is absorbed); step metrics never wait on it at all (dreambooth.tracking.spool).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Stages and reports read small artifacts (a plan, samples) back from MLflow: no progress bar per file.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    if stop_on_sigterm:
        # SIGTERM unwinds like Ctrl-C, so the runs a command opened are closed with the reason.
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGALRM, _stop)


def task_entry(task):
    """A KFP task's function: the process is configured before it runs."""

    @functools.wraps(task)
    def configured(*args, **kwargs):
        configure_process()
        try:
            return task(*args, **kwargs)
        finally:
            skip_teardown_collection()

    return configured


def skip_teardown_collection() -> None:
    """The process is about to end: its objects are not garbage-collected one last time.

    With torch, diffusers and MLflow imported, the collections during interpreter teardown take
    about a second, paid by every KFP task and command; frozen objects are left to the exit.
    Nothing is skipped: atexit handlers, flushes and finalizers all still run.
    """
    gc.freeze()


def _stop(signum, frame) -> None:
    # Raised between two bytecodes of the main thread. One that lands in a garbage-collection
    # callback is swallowed by Python, so it is raised again each second until unwinding begins.
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    raise KeyboardInterrupt("stopped by SIGTERM")


def unwinding() -> None:
    """A stop is being handled: no more repeats of the KeyboardInterrupt."""
    signal.setitimer(signal.ITIMER_REAL, 0)
