"""Each pipeline stage with its MLflow tracking: what a KFP component runs, callable without KFP.

A task takes the resolved config as JSON (as the pipeline passes it), runs the stage's plain
function inside the stage's child run and logs what users compare runs by.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dreambooth.config import RunConfig
from dreambooth.errors import InputError, TrainingDiverged
from dreambooth.registry import log_pipeline_model, register_candidate
from dreambooth.tracking import TAG_GATE, TAG_GATE_REASON, TAG_IDENTIFIER, TAG_MODEL_URI, finish_parent_run, stage_run

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def exit_on_user_error(task):
    """Bad input or a diverged run ends the task with its one-line message, not a traceback."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except (InputError, TrainingDiverged) as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2 if isinstance(error, InputError) else 1) from None

    return wrapper


def _open(stage: str, config: RunConfig, tracking_uri: str, job_id: str, job_name: str):
    return stage_run(config, tracking_uri, stage, job_id, job_name, config.subject.name)


@exit_on_user_error
def ingest_task(config_json: str, tracking_uri: str, job_id: str, job_name: str, subject_dir: str, output_dir: str) -> str:
    """Validate and normalise the subject photos; returns the identifier chosen."""
    from dreambooth.ingest import MANIFEST_FILE, ingest_subject

    from dreambooth.storage import local_folder

    config = RunConfig.from_json(config_json)
    with _open("ingest", config, tracking_uri, job_id, job_name) as run, local_folder(subject_dir) as photos:
        result = ingest_subject(photos, Path(output_dir), config)
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


def _train(stage, train_in_process, settings, run, tracking_uri, config, subject_dir, class_dir, identifier, output_dir):
    """One process, or one per GPU through dreambooth.distributed; the same result either way."""
    from dreambooth.distributed import launch
    from dreambooth.training.loop import planned_processes

    processes = planned_processes(settings)
    if processes == 1:
        return train_in_process(subject_dir, class_dir, identifier, config, output_dir, on_log=run.log_step_metrics)
    return launch(
        stage,
        processes,
        {
            "config_json": config.to_json(), "instance_dir": str(subject_dir),
            "class_dir": str(class_dir) if class_dir else "", "identifier": identifier, "output_dir": str(output_dir),
            "tracking_uri": tracking_uri, "run_id": run.run_id, "parent_run_id": run.parent_run_id,
        },
    )


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
        class_dir_or_none = Path(class_dir) if config.priors.enabled else None
        result = _train(
            "finetune", finetune, config.training, run, tracking_uri, config,
            Path(subject_dir), class_dir_or_none, identifier, Path(output_dir),
        )
        run.flush()
        summary = {
            "train_steps_per_second": result.steps_per_second,
            "train_images_per_second": result.images_per_second,
            "train_seconds": result.seconds,
            "resumed_from_step": result.resumed_from_step,
            "train_processes": result.processes,
            **{f"final_{key}": value for key, value in result.final_loss.items()},
        }
        run.log_metrics(summary, on_parent=True)
        run.log_dict(asdict(result), "finetune_result.json")
        model_uri = log_pipeline_model(tracking_uri, run.run_id, Path(output_dir))
        run.set_tags({TAG_MODEL_URI: model_uri}, on_parent=True)


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


@dataclass(frozen=True)
class EvaluationOutcome:
    metrics: dict[str, float]  # flat, for KFP's Metrics output
    report_markdown: str
    registered: Optional[str]  # "name@candidate (version N)", or None when rejected


@exit_on_user_error
def evaluate_task(
    config_json: str, tracking_uri: str, job_id: str, job_name: str, model_dir: str, subject_dir: str, output_dir: str
) -> EvaluationOutcome:
    """Score the model by the DreamBench protocol; register it as `candidate` if it passes the gate."""
    from dreambooth.evaluation.evaluate import evaluate_model
    from dreambooth.evaluation.report import render_report

    config = RunConfig.from_json(config_json)
    if not config.evaluation.enabled:
        return EvaluationOutcome(metrics={}, report_markdown="Evaluation is switched off (evaluation.enabled).\n", registered=None)
    with _open("evaluate", config, tracking_uri, job_id, job_name) as run:
        result = evaluate_model(model_dir, Path(subject_dir), config, Path(output_dir))
        metrics = {f"eval/{name}": value for name, value in result.overall.items()}
        metrics.update({f"eval/real_images_{name}": value for name, value in result.real_images.items()})
        for category, values in result.by_category.items():
            metrics.update({f"eval/{category}/{name}": value for name, value in values.items()})
        metrics.update({f"eval/{name}": value for name, value in result.throughput.items()})
        run.log_metrics(metrics, on_parent=True)
        run.log_dict(result.settings, "evaluation_config.json")
        run.log_table(
            {
                key: [getattr(score, key) for score in result.prompts]
                for key in ("prompt", "category", "dino", "clip_i", "clip_t", "div")
            },
            "eval_prompts.json",
        )
        for grid in sorted(Path(output_dir).glob("grid-*.png")):
            run.log_file(grid, "eval_grids")
        registered = None
        if result.gate.passed:
            name = config.evaluation.registered_model.format(subject=config.subject.name)
            # Logged by the fine-tune stage; a model trained elsewhere is logged here first.
            model_uri = run.parent_tag(TAG_MODEL_URI) or log_pipeline_model(tracking_uri, run.run_id, Path(model_dir))
            version = register_candidate(
                tracking_uri, model_uri, name, {"identifier": result.identifier, "class_noun": result.class_noun, "kfp_job_id": job_id}
            )
            registered = f"{name}@candidate (version {version})"
            run.set_tags({TAG_GATE: "passed", "dreambooth.registered_model": registered}, on_parent=True)
        else:
            run.set_tags({TAG_GATE: "rejected", TAG_GATE_REASON: "; ".join(result.gate.reasons)}, on_parent=True)
        report = render_report(result, registered)
        (Path(output_dir) / "report.md").write_text(report)
        run.log_file(Path(output_dir) / "report.md", on_parent=True)
    flat = {key.removeprefix("eval/").replace("/", "_"): value for key, value in metrics.items()}
    return EvaluationOutcome(metrics=flat, report_markdown=report, registered=registered)


@exit_on_user_error
def superres_task(
    config_json: str, tracking_uri: str, job_id: str, job_name: str,
    subject_dir: str, class_dir: str, model_dir: str, output_dir: str,
) -> None:
    """Fine-tune the upscaler on the subject; log its loss curves and a low-res / generic / personalised grid."""
    import tempfile

    from dreambooth.ingest import read_manifest
    from dreambooth.superres import finetune_upscaler, upscale_comparison_grid

    config = RunConfig.from_json(config_json)
    identifier = read_manifest(Path(subject_dir))["identifier"]["identifier"]
    with _open("super-resolution", config, tracking_uri, job_id, job_name) as run:
        run.set_tags({
            "dreambooth.superres_noise_levels": str(list(config.superres.train_noise_levels)),
            "dreambooth.superres_inference_noise_level": str(config.superres.inference_noise_level),
        })
        class_dir_or_none = Path(class_dir) if config.priors.enabled else None
        result = _train(
            "superres", finetune_upscaler, config.superres.training, run, tracking_uri, config,
            Path(subject_dir), class_dir_or_none, identifier, Path(output_dir),
        )
        run.flush()
        run.log_metrics({
            "superres_steps_per_second": result.steps_per_second,
            "superres_seconds": result.seconds,
            **{f"superres_final_{key}": value for key, value in result.final_loss.items()},
        }, on_parent=True)
        with tempfile.TemporaryDirectory() as scratch:
            grid = Path(scratch) / "superres-comparison.png"
            upscale_comparison_grid(Path(subject_dir), Path(model_dir), Path(output_dir), identifier, config).save(grid)
            run.log_file(grid, on_parent=True)
        run.log_folder(Path(output_dir), "upscaler")


@exit_on_user_error
def evaluate_upscaled_task(
    config_json: str, tracking_uri: str, job_id: str, job_name: str,
    model_dir: str, upscaler_dir: str, subject_dir: str, output_dir: str,
) -> EvaluationOutcome:
    """Score the two-stage cascade with the generic and with the personalised upscaler."""
    from dreambooth.evaluation.evaluate import evaluate_model

    config = RunConfig.from_json(config_json)
    metrics: dict[str, float] = {}
    lines = ["# DreamBench evaluation of the upscaled cascade", "", "| upscaler | resolution | DINO | CLIP-I | CLIP-T | DIV |", "|---|---|---|---|---|---|"]
    with _open("evaluate-upscaled", config, tracking_uri, job_id, job_name) as run:
        for label, upscaler in (("generic", config.superres.base), ("personalised", upscaler_dir)):
            result = evaluate_model(model_dir, Path(subject_dir), config, Path(output_dir) / label, upscaler=upscaler)
            values = {name: result.overall[name] for name in ("dino", "clip_i", "clip_t", "div")}
            metrics.update({f"eval/upscaled_{label}/{name}": value for name, value in values.items()})
            lines.append(
                f"| {label} (`{upscaler}`) | {result.settings['resolution']} px | "
                + " | ".join(f"{values[name]:.3f}" for name in ("dino", "clip_i", "clip_t", "div")) + " |"
            )
            for grid in sorted((Path(output_dir) / label).glob("grid-*.png")):
                run.log_file(grid, f"eval_grids_{label}")
        run.log_metrics(metrics, on_parent=True)
        report = "\n".join(lines) + "\n"
        (Path(output_dir) / "report.md").write_text(report)
        run.log_file(Path(output_dir) / "report.md", "upscaled")
    flat = {key.removeprefix("eval/").replace("/", "_"): value for key, value in metrics.items()}
    return EvaluationOutcome(metrics=flat, report_markdown=report, registered=None)


def finish_task(config_json: str, tracking_uri: str, job_id: str, pipeline_state: str) -> None:
    config = RunConfig.from_json(config_json)
    finish_parent_run(tracking_uri, config.tracking.experiment, job_id, pipeline_state)

