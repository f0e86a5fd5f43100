"""Several GPUs per fine-tune: one process per GPU, started by torch.distributed.run.

The task's own process keeps the MLflow stage run; it starts the workers and waits. Workers train
together through accelerate (NCCL on GPUs, gloo on CPUs); only the main one logs step metrics
to the stage's run, writes checkpoints' markers and saves the model, and it reports the result
(or the one-line error) back in a JSON file.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from dreambooth.errors import InputError, Preempted, TrackingUnavailable, TrainingDiverged
from dreambooth.process import configure_process
from dreambooth.stages import FINE_TUNE, SUPER_RESOLUTION
from dreambooth.training.saving import FineTuneResult

STAGES = (FINE_TUNE.name, SUPER_RESOLUTION.name)
ERRORS = {error.__name__: error for error in (InputError, TrainingDiverged, Preempted, TrackingUnavailable)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(stage: str, processes: int, arguments: dict) -> FineTuneResult:
    """Run `stage` with `processes` workers; arguments: config_json, instance_dir, class_dir, identifier,
    output_dir, tracking_uri, run_id, parent_run_id, spool_dir, wait_seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        request, outcome = Path(scratch) / "request.json", Path(scratch) / "outcome.json"
        request.write_text(json.dumps({**arguments, "outcome": str(outcome)}))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "dreambooth.tasks.distributed", stage, str(request),
        ]
        completed = subprocess.run(command)
        report = json.loads(outcome.read_text()) if outcome.is_file() else {}
    if "error" in report:
        raise ERRORS[report["kind"]](report["error"])
    if completed.returncode != 0 or "result" not in report:
        raise RuntimeError(f"{stage} with {processes} processes failed (exit code {completed.returncode}); see the log above")
    return FineTuneResult(**report["result"])


def _worker(stage: str, request_file: str) -> None:
    from dreambooth.config import RunConfig
    from dreambooth.fine_tune import fine_tune
    from dreambooth.super_resolution import fine_tune_upscaler
    from dreambooth.progress import StageProgress
    from dreambooth.tracking import StageRun, client
    from dreambooth.training.loop import process_state

    request = json.loads(Path(request_file).read_text())
    state = process_state()
    run = StageRun(client(request["tracking_uri"]), request["run_id"], request["parent_run_id"], request["tracking_uri"],
                   Path(request["spool_dir"]), request["wait_seconds"], StageProgress(request["scope"], request["stage"]))
    train_stage = fine_tune if stage == FINE_TUNE.name else fine_tune_upscaler
    outcome = Path(request["outcome"])
    try:
        result = train_stage(
            Path(request["instance_dir"]),
            Path(request["class_dir"]) if request["class_dir"] else None,
            request["identifier"],
            RunConfig.from_json(request["config_json"]),
            Path(request["output_dir"]),
            on_log=run.training_log(request["total_steps"]),  # called on the main process only
            release=False,  # the task releases the checkpoints once the model is recorded
            tracking_run=request["run_id"],
        )
        if state.is_main_process:
            run.flush()
            outcome.write_text(json.dumps({"result": asdict(result)}))
    except (InputError, TrainingDiverged, Preempted, TrackingUnavailable) as error:
        if state.is_main_process:
            outcome.write_text(json.dumps({"error": str(error), "kind": type(error).__name__}))
        raise SystemExit(2)


if __name__ == "__main__":
    configure_process()
    if len(sys.argv) != 3 or sys.argv[1] not in STAGES:
        raise SystemExit(f"usage: python -m dreambooth.tasks.distributed {{{','.join(STAGES)}}} REQUEST.json")
    _worker(sys.argv[1], sys.argv[2])
