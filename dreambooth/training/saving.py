"""Saving a trained result: the whole pipeline folder, or for LoRA the adapter alone, with its
metadata. The training states go then; a marker stays in the checkpoint folder, naming the saved
model, until the stage has recorded it in MLflow: a retry after a tracking outage or a kill at that
point reuses the model instead of training again. One run at a time holds a checkpoint folder."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

from dreambooth.errors import InputError
from dreambooth.models.loading import METADATA_FILE
from dreambooth.training.embeddings import save_learned_token
from dreambooth.training.lora import save_lora_adapter
from dreambooth.training.loop import list_checkpoints, process_state

log = logging.getLogger(__name__)

TRAINED_MARKER = "trained.json"
SNAPSHOTS = "snapshots"  # the model at each step evaluation.select scores


@dataclass(frozen=True)
class FineTuneResult:
    model_dir: str
    steps: int
    resumed_from_step: int
    steps_per_second: float
    images_per_second: float
    seconds: float
    final_loss: dict
    processes: int = 1
    validation_images: list = field(default_factory=list)  # [step, image path] pairs, oldest first
    checkpoints: str = ""  # the run's checkpoint folder, released once the model is recorded
    resumed_from_run: str = ""  # the tracking run that wrote the checkpoint this training resumed
    trained_by_run: str = ""  # the tracking run that trained and saved it (a later attempt reusing it links that run)
    selection: dict = field(default_factory=dict)  # evaluation.select: the step kept, why, and every step's scores
    prompts: dict = field(default_factory=dict)  # each subject prompt trained on -> examples with it (this process)


def save_trained_pipeline(
    pipeline, result, output_dir: Path, metadata: dict, checkpoints: Path, keep_checkpoints: bool, images_per_step: int,
    owner: str = "",
) -> FineTuneResult:
    """On the main process: the whole pipeline folder (safetensors), or what loads on the base alone:
    the LoRA adapters (result.adapters) and the learned token's embedding (result.embedding); with
    its metadata. Then the training states give way to the marker naming the model."""
    saved = FineTuneResult(
        model_dir=str(output_dir),
        steps=result.steps_completed,
        resumed_from_step=result.resumed_from_step,
        steps_per_second=result.steps_per_second,
        images_per_second=result.steps_per_second * images_per_step,
        seconds=result.seconds,
        final_loss=result.final_loss,
        processes=result.processes,
        checkpoints=str(checkpoints),
        resumed_from_run=result.resumed_from_run,
        trained_by_run=owner,
        prompts=result.prompts,
    )
    if process_state().is_main_process:
        pipeline.to("cpu")
        write_result(pipeline, output_dir, metadata, result.adapters, result.embedding)
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / TRAINED_MARKER).write_text(json.dumps(asdict(saved)))
        if not keep_checkpoints:
            for state in list_checkpoints(checkpoints):
                shutil.rmtree(state, ignore_errors=True)
    return saved


def write_result(pipeline, output_dir: Path, metadata: dict, adapters: dict, embedding: dict) -> None:
    """A result folder: the whole pipeline, or the LoRA `adapters` and/or the learned token's
    `embedding` that load on the base; its metadata last (a folder without it is incomplete)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if adapters:
        save_lora_adapter(pipeline, adapters, output_dir, metadata.get("single_file", False))
    if embedding:
        save_learned_token(embedding, output_dir)
    if not adapters and not embedding:
        pipeline.save_pretrained(output_dir, safe_serialization=True)
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def snapshot_folder(checkpoints: Path, step: int) -> Path:
    """Where the model as it was at `step` is kept for evaluation.select (beside the checkpoints, released with them)."""
    return checkpoints / SNAPSHOTS / f"step-{step:06d}"


def write_snapshot(pipeline, checkpoints: Path, step: int, metadata: dict, adapters: dict, embedding: dict) -> None:
    """The model being trained, as a result folder of its own; written aside and renamed, so a kill
    leaves either a whole snapshot or none. One already there (a resumed run) is kept."""
    target = snapshot_folder(checkpoints, step)
    if (target / METADATA_FILE).is_file():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_result(pipeline, partial, {**metadata, "step": step}, adapters, embedding)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


@contextmanager
def claim_checkpoints(checkpoints: Path) -> Iterator[None]:
    """Hold the checkpoint folder for this run: a second run of the same subject with the same
    settings (same fingerprint, same folder) is refused instead of writing the same checkpoints."""
    if not process_state().is_main_process:
        yield
        return
    checkpoints.parent.mkdir(parents=True, exist_ok=True)
    lock_file = checkpoints.parent / f"{checkpoints.name}.lock"
    with open(lock_file, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{checkpoints}: another run is training this subject with the same settings right now; "
                "let it finish (a re-run then finds its result), or change a setting"
            ) from None
        try:
            yield
        finally:
            if not checkpoints.exists():  # released: nothing left to guard
                lock_file.unlink(missing_ok=True)


def saved_result(checkpoints: Path, output_dir: Path) -> Optional[FineTuneResult]:
    """The result an earlier attempt trained and saved but never recorded, its model now in output_dir; else None."""
    marker = checkpoints / TRAINED_MARKER
    if not marker.is_file():
        return None
    saved = FineTuneResult(**json.loads(marker.read_text()))
    source = Path(saved.model_dir)
    if not (source / METADATA_FILE).is_file():
        return None  # the folder it names is gone: train again
    if source.resolve() != output_dir.resolve():
        shutil.copytree(source, output_dir, dirs_exist_ok=True)
    log.warning("reusing the model an earlier attempt trained and saved (%s): nothing to train", source)
    # Its steps are the earlier attempt's run's: this run links it and carries its curve (StageRun.continue_from).
    return replace(saved, model_dir=str(output_dir), resumed_from_step=saved.steps,
                   resumed_from_run=saved.trained_by_run or saved.resumed_from_run)


def keep_step(result: FineTuneResult, step_model: Path, selection: dict) -> FineTuneResult:
    """The model of the selected step becomes the result (its folder replaces the last step's);
    the marker records the selection, so a retry reuses it instead of choosing again."""
    chosen = replace(result, selection=selection)
    if process_state().is_main_process:
        output_dir = Path(result.model_dir)
        shutil.rmtree(output_dir)
        shutil.copytree(step_model, output_dir)
        if result.checkpoints:
            (Path(result.checkpoints) / TRAINED_MARKER).write_text(json.dumps(asdict(chosen)))
    return chosen


def release_checkpoints(result: FineTuneResult, keep_checkpoints: bool) -> None:
    """Once the model is recorded: the checkpoint folder goes (or, when kept, only the marker)."""
    if not result.checkpoints:
        return
    folder = Path(result.checkpoints)
    if keep_checkpoints:
        (folder / TRAINED_MARKER).unlink(missing_ok=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        (folder.parent / f"{folder.name}.lock").unlink(missing_ok=True)
