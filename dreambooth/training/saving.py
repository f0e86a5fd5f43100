"""Saving a trained result: the whole pipeline folder, or for LoRA the adapter alone, with its
metadata; then the checkpoints go, which only existed to survive a kill."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.models import METADATA_FILE
from dreambooth.training.lora import save_lora_adapter
from dreambooth.training.loop import process_state


@dataclass(frozen=True)
class FinetuneResult:
    model_dir: str
    steps: int
    resumed_from_step: int
    steps_per_second: float
    images_per_second: float
    seconds: float
    final_loss: dict
    processes: int = 1
    validation_images: list = field(default_factory=list)  # [step, image path] pairs, oldest first


def save_trained_pipeline(
    pipeline, result, output_dir: Path, metadata: dict, checkpoints: Path, keep_checkpoints: bool, images_per_step: int
) -> FinetuneResult:
    """On the main process: the whole pipeline folder (safetensors) or, for LoRA, the adapter alone,
    with its metadata; then drop the checkpoints, which only existed to survive a kill."""
    if process_state().is_main_process:
        pipeline.to("cpu")
        output_dir.mkdir(parents=True, exist_ok=True)
        if metadata.get("method") == "lora":
            save_lora_adapter(pipeline, result.modules, output_dir, metadata.get("single_file", False))
        else:
            pipeline.save_pretrained(output_dir, safe_serialization=True)
        (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    return FinetuneResult(
        model_dir=str(output_dir),
        steps=result.steps_completed,
        resumed_from_step=result.resumed_from_step,
        steps_per_second=result.steps_per_second,
        images_per_second=result.steps_per_second * images_per_step,
        seconds=result.seconds,
        final_loss=result.final_loss,
        processes=result.processes,
    )
