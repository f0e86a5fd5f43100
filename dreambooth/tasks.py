"""Each pipeline stage with its MLflow tracking: what a KFP component runs, callable without KFP.

A task takes the resolved config as JSON (as the pipeline passes it), runs the stage's plain
function inside the stage's child run and logs what users compare runs by.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from pathlib import Path

from dreambooth.config import RunConfig
from dreambooth.errors import InputError, TrainingDiverged
from dreambooth.tracking import TAG_IDENTIFIER, finish_parent_run, stage_run

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def exit_on_user_error(task):
    """Bad input or a diverged run ends the task with its one-line message, not a traceback."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except (InputError, TrainingDiverged) as error:
            raise SystemExit(f"error: {error}") from None

    return wrapper


def _open(stage: str, config: RunConfig, tracking_uri: str, job_id: str, job_name: str):
    return stage_run(config, tracking_uri, stage, job_id, job_name, config.subject.name)


@exit_on_user_error
def ingest_task(config_json: str, tracking_uri: str, job_id: str, job_name: str, subject_dir: str, output_dir: str) -> str:
    """Validate and normalise the subject photos; returns the identifier chosen."""
    from dreambooth.ingest import MANIFEST_FILE, ingest_subject

    config = RunConfig.from_json(config_json)
    with _open("ingest", config, tracking_uri, job_id, job_name) as run:
        result = ingest_subject(Path(subject_dir), Path(output_dir), config)
        run.set_tags(
            {TAG_IDENTIFIER: result.identifier.identifier, "dreambooth.identifier_reason": result.identifier.reason},
            on_parent=True,
        )
        run.log_metrics({"subject_images": len(result.images), "duplicates_dropped": len(result.duplicates_dropped)})
        run.log_file(Path(output_dir) / MANIFEST_FILE, on_parent=True)
    return result.identifier.identifier


@exit_on_user_error
def priors_task(config_json: str, tracking_uri: str, job_id: str, job_name: str, output_dir: str) -> int:
    """Generate (or take the user's) class images; returns how many there are."""
    from dreambooth.priors import generate_class_priors

    config = RunConfig.from_json(config_json)
    with _open("class-priors", config, tracking_uri, job_id, job_name) as run:
        if not config.priors.enabled:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            run.set_tags({"dreambooth.priors": "disabled"})
            return 0
        result = generate_class_priors(config, Path(output_dir))
        run.set_tags({"dreambooth.class_prompt": result.class_prompt, "dreambooth.priors_source": result.source})
        _log_preview(run, Path(output_dir), result.class_prompt)
        run.log_metrics(
            {
                "class_images": result.count,
                "class_images_generated": result.generated,
                "priors_seconds": result.seconds,
                "priors_images_per_second": result.images_per_second,
            }
        )
    return result.count


def _log_preview(run, class_dir: Path, class_prompt: str, count: int = 8) -> None:
    """A row of the first class images, so a glance in MLflow shows what the prior looks like."""
    import tempfile

    from dreambooth.finetune import list_images
    from dreambooth.images import labelled_grid, load_rgb

    images = [(path.stem, load_rgb(path, 1 << 40).image) for path in list_images(class_dir)[:count]]
    if not images:
        return
    with tempfile.TemporaryDirectory() as scratch:
        preview = Path(scratch) / "class-priors-preview.png"
        labelled_grid([(class_prompt, images)]).save(preview)
        run.log_file(preview)


@exit_on_user_error
def finetune_task(
    config_json: str, tracking_uri: str, job_id: str, job_name: str, subject_dir: str, class_dir: str, output_dir: str
) -> None:
    """Fine-tune the base model; log loss curves, throughput and the model folder."""
    from dreambooth.finetune import finetune
    from dreambooth.ingest import read_manifest

    config = RunConfig.from_json(config_json)
    identifier = read_manifest(Path(subject_dir))["identifier"]["identifier"]
    with _open("fine-tune", config, tracking_uri, job_id, job_name) as run:
        result = finetune(
            Path(subject_dir),
            Path(class_dir) if config.priors.enabled else None,
            identifier,
            config,
            Path(output_dir),
            on_log=run.log_step_metrics,
        )
        run.flush()
        summary = {
            "train_steps_per_second": result.steps_per_second,
            "train_images_per_second": result.images_per_second,
            "train_seconds": result.seconds,
            "resumed_from_step": result.resumed_from_step,
            **{f"final_{key}": value for key, value in result.final_loss.items()},
        }
        run.log_metrics(summary, on_parent=True)
        run.log_dict(asdict(result), "finetune_result.json")
        run.log_folder(Path(output_dir), "model")


@exit_on_user_error
def samples_task(config_json: str, tracking_uri: str, job_id: str, job_name: str, model_dir: str, output_dir: str) -> str:
    """Render the base-vs-fine-tuned comparison grid; returns its path."""
    from dreambooth.samples import render_samples

    config = RunConfig.from_json(config_json)
    with _open("samples", config, tracking_uri, job_id, job_name) as run:
        result = render_samples(Path(model_dir), config, Path(output_dir))
        run.log_file(Path(result.grid_path), on_parent=True)
        run.log_folder(Path(output_dir), "samples")
        run.log_dict({"prompts": result.prompts, "images": result.image_files}, "samples.json")
    return result.grid_path


def finish_task(config_json: str, tracking_uri: str, job_id: str, pipeline_state: str) -> None:
    config = RunConfig.from_json(config_json)
    finish_parent_run(tracking_uri, config.tracking.experiment, job_id, pipeline_state)

