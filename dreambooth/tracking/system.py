"""System metrics on a stage's run: MLflow's own monitor (CPU, memory, disk, network; GPU
utilisation and memory where nvidia-ml-py finds a GPU), sampled every `tracking.system_metrics_seconds`.

A stage shorter than one interval still gets a sample, taken as it ends. Stopping waits a few
seconds at most: with the tracking server away, the monitor is left behind rather than the stage.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

STOP_WAIT_SECONDS = 10.0


@contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval: float, resume: bool = False) -> Iterator[None]:
    if interval <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=tracking_uri)
        monitor.start()
    except Exception as error:  # never a reason for a stage to fail
        log.warning("system metrics: not recorded (%s)", error)
        yield
        return
    try:
        yield
    finally:
        stopper = threading.Thread(target=_stop, args=(monitor,), daemon=True, name="stop-system-metrics")
        stopper.start()
        stopper.join(STOP_WAIT_SECONDS)


def _stop(monitor) -> None:
    try:
        monitor.finish()
        monitor.collect_metrics()  # the stage's last moment: a short stage has at least this sample
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as error:
        log.warning("system metrics: the last sample was not recorded (%s)", error)
