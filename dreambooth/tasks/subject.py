"""The stages of one subject, and the class priors of one group, each inside its MLflow run.

A task takes the subject's resolved settings as JSON (as the pipeline passes them) and the id of
the subject's run; it runs the stage's plain function inside a stage run under it and logs what
users compare runs by. A subject's own bad input or a diverged fine-tune ends that subject alone:
the reason goes on its run, the task returns None (KFP: status `failed`) and the batch goes on.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from PIL import Image

from dreambooth.catalogue.planning import PriorOutcome
from dreambooth.config import RunConfig
from dreambooth.errors import InputError, Preempted, TrackingUnavailable, TrainingDiverged
from dreambooth.models.loading import METADATA_FILE, allow_pickle_weights
from dreambooth.process import task_entry
from dreambooth.progress import SKIPPED, StageProgress
from dreambooth.stages import (
    CLASS_PRIORS,
    EVALUATE,
    EVALUATE_UPSCALED,
    FINE_TUNE,
    INGEST,
    SAMPLES,
    SUPER_RESOLUTION,
    Stage,
)
from dreambooth.storage import content_digests, is_gcs, local_folder
from dreambooth.watermark import payload_for, save_marked
from dreambooth.tracking import (
    FAILED,
    SPOOL_FOLDER,
    TAG_CLASS_NOUN,
    TAG_CLASS_PROMPT,
    TAG_EVALUATION,
    TAG_EVAL_PROTOCOL,
    TAG_GATE,
    TAG_GATE_REASON,
    TAG_IDENTIFIER,
    TAG_IDENTIFIER_REASON,
    TAG_MODEL_LOCATION,
    TAG_MODEL_URI,
    TAG_PHOTOS,
    TAG_PICKLE_ALLOWED,
    TAG_PRIOR_KEY,
    TAG_PRIORS_SOURCE,
    TAG_REGISTERED,
    TAG_REGISTERED_VERSION,
    TAG_RUN_NAME,
    TAG_SELECTED_STEP,
    TAG_SELECTION_REASON,
    TAG_SUBJECT,
    TAG_SUBJECT_STATUS,
    TAG_SUPERRES_INFERENCE_NOISE_LEVEL,
    TAG_SAFETY,
    TAG_SUPERRES_NOISE_LEVELS,
    TAG_WATERMARK,
    StageRun,
    client,
    headline_params,
    log_photos_input,
    photos_dataset,
    record_failure,
    stage_run,
    unreachable,
)

if TYPE_CHECKING:
    from dreambooth.training.saving import FineTuneResult

OK, FAILED_STATUS = "ok", "failed"  # what a stage reports to the DAG


def subject_stage(stage: Stage):
    """Run the task inside the subject's `stage` run; skip it when the subject already failed.

    The task is called as task(config, run, *args) and this wrapper as
    wrapper(config_json, tracking_uri, subject_run_id, *args). A preempted or tracking-less task
    exits non-zero with one line, leaving the subject to KFP's retry.
    """

    def decorate(task):
        @task_entry
        @functools.wraps(task)
        def wrapper(config_json: str, tracking_uri: str, subject_run_id: str, *args, **kwargs):
            try:
                subject = client(tracking_uri).get_run(subject_run_id)
                if subject.data.tags.get(TAG_SUBJECT_STATUS) == FAILED:
                    StageProgress(subject.data.tags.get(TAG_SUBJECT, ""), stage.name).state(SKIPPED, "the subject already failed")
                    return None
                config = RunConfig.from_json(config_json)
                # Every subject stage loads torch; loaded before its run opens, a SIGTERM (a cancelled job) never
                # lands inside torch's import, where it aborts the interpreter (SIGABRT) instead of unwinding.
                import torch  # noqa: F401

                with stage_run(tracking_uri, subject_run_id, stage, **_run_settings(config)) as run:
                    _apply_weights_policy(config, run)
                    return task(config, run, *args, **kwargs)
            except (InputError, TrainingDiverged) as error:
                record_failure(tracking_uri, subject_run_id, stage.name, str(error).splitlines()[0])
                print(f"error: {stage.name}: {error}", file=sys.stderr)
                return None
            except (Preempted, TrackingUnavailable) as error:
                _exit_for(stage.name, error)
            except Exception as error:
                if not unreachable(error):
                    raise
                _exit_for(stage.name, TrackingUnavailable(f"tracking at {tracking_uri} unreachable: {error}"))

        return wrapper

    return decorate


def _apply_weights_policy(config: RunConfig, run: StageRun) -> None:
    allow_pickle_weights(config.model.allow_pickle)
    if config.model.allow_pickle:
        run.set_tags({TAG_PICKLE_ALLOWED: "true"})


def _run_settings(config: RunConfig) -> dict:
    """What every stage run gets from the config: the step-metric journal, headline params, system metrics."""
    return {
        "spool_dir": Path(config.storage.work_dir) / SPOOL_FOLDER, "wait_seconds": config.tracking.outage_tolerance,
        "params": headline_params(config), "system_metrics_seconds": config.tracking.system_metrics_seconds,
        "prices": config.cost.prices,
    }


def _exit_for(stage: str, error: Exception) -> None:
    """One line and a non-zero exit: KFP retries the task (143 is a SIGTERM's usual code)."""
    print(f"error: {stage}: {str(error).splitlines()[0]}", file=sys.stderr)
    raise SystemExit(143 if isinstance(error, Preempted) else 3)


def _identifier(subject_dir: Path) -> str:
    from dreambooth.ingest.photos import read_manifest

    return read_manifest(subject_dir)["identifier"]["identifier"]


@subject_stage(INGEST)
def ingest_task(config: RunConfig, run: StageRun, photos: str, output_dir: str) -> str:
    """Validate and normalise the subject photos; returns the identifier chosen."""
    from dreambooth.ingest.photos import MANIFEST_FILE, ingest_subject

    with local_folder(photos) as folder:
        result = ingest_subject(folder, Path(output_dir), config)
        keep_drafted_captions(photos, folder, result.drafted_captions)
    # The uploaded bytes, names aside: two runs on the same photos share the digest.
    digest = hashlib.sha256("".join(sorted(content_digests(photos).values())).encode()).hexdigest()[:32]
    dataset = photos_dataset(f"{config.subject.name}-photos", photos, digest, len(result.images))
    for run_id in (run.run_id, run.parent_run_id):  # later stages take it from the subject run's tag
        log_photos_input(run.client, run_id, dataset)
    run.set_tags(
        {TAG_IDENTIFIER: result.identifier.identifier, TAG_IDENTIFIER_REASON: result.identifier.reason,
         TAG_PHOTOS: dataset},
        on_parent=True,
    )
    run.log_metrics({"subject_images": len(result.images), "duplicates_dropped": len(result.duplicates_dropped)}, on_parent=True)
    run.log_file(Path(output_dir) / MANIFEST_FILE, on_parent=True)
    # Each photo as it will train: the bucket it goes to and its caption (the instance prompt when it has none).
    run.log_table({"photo": [entry.source_file for entry in result.images],
                   "bucket": [f"{entry.bucket[0]}x{entry.bucket[1]}" for entry in result.images],
                   "caption": [entry.caption or result.instance_prompt for entry in result.images]}, "photos.json")
    return result.identifier.identifier


def keep_drafted_captions(photos: str, folder: Path, drafted: list[str]) -> None:
    """ingest.captioner wrote its drafts beside a local copy of a bucket's photos: they go beside the
    photos in the bucket, where people correct them (an archive cannot take them; the run's photos.json has them)."""
    from dreambooth.archives import is_archive
    from dreambooth.storage import upload_file
    from dreambooth.training.data import caption_file

    if not drafted:
        return
    if is_archive(photos):
        print(f"warning: {photos}: drafted captions cannot be written into an archive; they are in the run's photos.json", file=sys.stderr)
        return
    if not is_gcs(photos):  # written beside the photos already
        return
    for name in drafted:
        caption = caption_file(folder / name)
        upload_file(caption, f"{photos.rstrip('/')}/{caption.name}")


def _train(stage: Stage, train_in_process, settings, run: StageRun, config, subject_dir, class_dir, identifier, output_dir):
    """One process, or one per GPU through dreambooth.tasks.distributed; the same result either way."""
    from dreambooth.tasks.distributed import launch
    from dreambooth.training.loop import planned_processes

    processes = planned_processes(settings)
    # The checkpoint folder's marker stays until the model is recorded (release_checkpoints): a
    # retry after a tracking outage reuses the saved model.
    if processes == 1:
        result = train_in_process(subject_dir, class_dir, identifier, config, output_dir, on_log=run.training_log(settings.max_steps),
                                  release=False, tracking_run=run.run_id)
    else:
        result = launch(stage.name, processes, {
            "config_json": config.to_json(), "instance_dir": str(subject_dir),
            "class_dir": str(class_dir) if class_dir else "", "identifier": identifier, "output_dir": str(output_dir),
            "tracking_uri": run.tracking_uri, "run_id": run.run_id, "parent_run_id": run.parent_run_id,
            "spool_dir": str(run.spool_dir), "wait_seconds": run.wait_seconds,
            "scope": run.progress.scope, "stage": run.progress.stage, "total_steps": settings.max_steps,
        })
    run.flush()  # every step metric in MLflow before the summary; TrackingUnavailable (model saved) if not
    run.continue_from(result.resumed_from_run, result.resumed_from_step)
    return result


@contextmanager
def _class_folder(config: RunConfig, class_images: str) -> Iterator[Optional[Path]]:
    """The subject's class images as a local folder; None when it trains without prior preservation."""
    if not (config.priors.enabled and class_images):
        yield None
        return
    with local_folder(class_images) as folder:
        yield folder


@subject_stage(FINE_TUNE)
def fine_tune_task(config: RunConfig, run: StageRun, subject_dir: str, class_images: str, output_dir: str, model_location: str) -> str:
    """Fine-tune the base model; log loss curves, throughput and the model; returns the model folder."""
    from dreambooth.fine_tune import fine_tune
    from dreambooth.tracking.registry import log_pipeline_model
    from dreambooth.training.saving import release_checkpoints

    with _class_folder(config, class_images) as class_dir:
        result = _train(
            FINE_TUNE, fine_tune, config.training, run, config,
            Path(subject_dir), class_dir, _identifier(Path(subject_dir)), Path(output_dir),
        )
    if config.evaluation.select and not result.selection:  # a retry reuses the choice its marker holds
        result = keep_selected_checkpoint(result, Path(subject_dir), config)
    summary = {
        "train_steps": result.steps,
        "train_steps_per_second": result.steps_per_second,
        "train_images_per_second": result.images_per_second,
        "train_seconds": result.seconds,
        "resumed_from_step": result.resumed_from_step,
        "train_processes": result.processes,
        **{f"final_{key}": value for key, value in result.final_loss.items()},
    }
    run.log_metrics(summary, on_parent=True)
    run.log_dict(asdict(result), "finetune_result.json")
    if result.prompts:  # what the text encoder was given: the photos' captions, and the bare prompt's share
        run.log_table({"prompt": list(result.prompts), "examples": list(result.prompts.values())}, "training_prompts.json")
    if result.selection:
        _record_selection(run, result.selection)
    for step, path in result.validation_images:  # the MLflow UI's image slider shows the subject appearing
        with Image.open(path) as image:
            run.client.log_image(run.run_id, image, key="validation", step=step)
    model_uri = log_pipeline_model(run.tracking_uri, run.run_id, Path(output_dir))
    run.set_tags({TAG_MODEL_URI: model_uri, TAG_MODEL_LOCATION: model_location or output_dir,
                  TAG_WATERMARK: payload_for(output_dir)}, on_parent=True)
    release_checkpoints(result, config.training.keep_checkpoints)
    return output_dir


def keep_selected_checkpoint(result: FineTuneResult, subject_dir: Path, config: RunConfig) -> FineTuneResult:
    """evaluation.select: score the model of each step it names (kept aside by the fine-tune) and keep the one its
    rule picks as the result."""
    from dreambooth.evaluation.evaluate import EvaluationInputs
    from dreambooth.evaluation.select import score_checkpoints, selection_record
    from dreambooth.training.saving import keep_step, snapshot_folder

    select, checkpoints = config.evaluation.select, Path(result.checkpoints)
    snapshots = {step: snapshot_folder(checkpoints, step) for step in select.scored_steps(config.training.max_steps)}
    missing = [step for step, folder in snapshots.items() if not (folder / METADATA_FILE).is_file()]
    if missing:  # e.g. training.keep_checkpoints false and an earlier attempt's folder released
        raise InputError(f"{checkpoints}: the models of steps {missing} are gone; delete the folder to train again")
    scores = score_checkpoints(snapshots, subject_dir, EvaluationInputs.of(config), checkpoints / "selection")
    selection = selection_record(scores, select)
    return keep_step(result, snapshots[selection["step"]], selection)


def _record_selection(run: StageRun, selection: dict) -> None:
    """evaluation.select: each scored step's quick figures as curves, and the step kept and why on the subject's run."""
    for score in selection["scores"]:
        run.log_step_metrics(score["step"], {f"select/{name}": score[name] for name in ("dino", "clip_i", "clip_t", "pres")})
    run.flush()
    run.log_metrics({"selected_step": selection["step"]}, on_parent=True)
    run.set_tags({TAG_SELECTED_STEP: str(selection["step"]), TAG_SELECTION_REASON: selection["reason"]}, on_parent=True)


@subject_stage(SAMPLES)
def samples_task(config: RunConfig, run: StageRun, model_dir: str, output_dir: str, page_path: str = "") -> str:
    """Render the base-vs-fine-tuned comparison grid (also as an HTML page for KFP); returns its path."""
    from dreambooth.reports.pages import image_page, write_page
    from dreambooth.samples import render_samples

    result = render_samples(Path(model_dir), config, Path(output_dir))
    if page_path:
        title = f"{config.subject.name}: fine-tuned vs base, same prompts and seeds"
        write_page(page_path, image_page(title, [("samples", Path(result.grid_path))]), title)
    run.log_file(Path(result.grid_path), on_parent=True)
    # On the subject's run too: `compare` puts the same prompt and seed of different runs side by side.
    run.log_folder(Path(output_dir), "samples", on_parent=True)
    run.log_dict({"prompts": result.prompts, "images": result.image_files}, "samples.json")
    return result.grid_path


def _images_progress(run: StageRun, label: str = ""):
    return lambda done, total: run.report(done, total, "images", label)


@dataclass(frozen=True)
class EvaluationOutcome:
    metrics: dict[str, float]  # flat, for KFP's Metrics output
    report_markdown: str
    registered: Optional[str]  # "name@candidate (version N)", or None when rejected
    page_html: str = ""  # the grids inline, for KFP's HTML output


def write_kfp_evaluation(outcome: Optional[EvaluationOutcome], log_metric, report_path: str, page_path: str = "") -> bool:
    """An evaluation's KFP outputs: its metrics, Markdown report and page of grids (a pointer to MLflow when it failed)."""
    from dreambooth.reports.pages import write_page

    with open(report_path, "w") as markdown:
        markdown.write(outcome.report_markdown if outcome else "The evaluation failed; the reason is on the subject's MLflow run.\n")
    for name, value in (outcome.metrics if outcome else {}).items():
        log_metric(name, value)
    if page_path:
        write_page(page_path, outcome.page_html if outcome else None, "evaluation")
    return outcome is not None


def _grid_images(folder: Path, metrics: dict[str, float], label: str = "") -> tuple[str, list[tuple[str, Path]]]:
    """The evaluation's grids (one per prompt category) as captioned images, and a line of headline figures."""
    figures = ", ".join(f"{name.upper().replace('_', '-')} {metrics[name]:.3f}" for name in ("dino", "clip_i", "clip_t", "pres", "div")
                        if name in metrics)
    grids = [(f"{label}{grid.stem.removeprefix('grid-')}", grid) for grid in sorted(folder.glob("grid-*.png"))]
    return figures, grids


def evaluation_protocol(settings: dict, config: RunConfig) -> str:
    """What makes two evaluations comparable, as one JSON string (tagged on the subject's run)."""
    import hashlib
    import json

    prompts = "dreambench"
    if config.evaluation.prompt_file:
        prompts = hashlib.sha256(Path(config.evaluation.prompt_file).read_bytes()).hexdigest()[:12]
    protocol = {
        "prompts": prompts,
        "max_prompts_per_category": config.evaluation.max_prompts_per_category,
        **{key: settings[key] for key in ("dino_model", "clip_model", "lpips_model", "images_per_prompt", "pres_images",
                                          "seed", "scheduler", "num_inference_steps", "guidance_scale", "resolution")},
    }
    return json.dumps(protocol, sort_keys=True)


def _evaluation_disabled(run: StageRun) -> EvaluationOutcome:
    run.set_tags({TAG_EVALUATION: "disabled"})
    return EvaluationOutcome(metrics={}, report_markdown="Evaluation is switched off (evaluation.enabled).\n", registered=None)


@subject_stage(EVALUATE)
def evaluate_task(
    config: RunConfig, run: StageRun, model_dir: str, subject_dir: str, output_dir: str, class_images: str = ""
) -> Optional[EvaluationOutcome]:
    """Score the model by the DreamBench protocol and the learning check (subject and class denoising
    loss, base vs fine-tuned); register it as `candidate` if it passes the gate."""
    from dreambooth.evaluation.evaluate import (
        EvaluationInputs, GateDecision, baseline_decision, champion_decision, evaluate_baseline, evaluate_model,
    )
    from dreambooth.evaluation.safety import check_images
    from dreambooth.evaluation.learning import learning_check
    from dreambooth.evaluation.report import render_report
    from dreambooth.tracking.registry import current_champion, log_pipeline_model, register_candidate
    from dreambooth.reports.pages import image_page
    from dreambooth.baseline import is_reference_result

    if not config.evaluation.enabled:
        return _evaluation_disabled(run)
    result = evaluate_model(model_dir, Path(subject_dir), EvaluationInputs.of(config), Path(output_dir), on_progress=_images_progress(run))
    metrics = {f"eval/{name}": value for name, value in result.overall.items()}
    metrics.update({f"eval/real_images_{name}": value for name, value in result.real_images.items()})
    for category, values in result.by_category.items():
        metrics.update({f"eval/{category}/{name}": value for name, value in values.items()})
    metrics.update({f"eval/{name}": value for name, value in result.throughput.items()})
    learned = None  # the zero-shot baseline learned nothing to check
    if not is_reference_result(model_dir):
        with _class_folder(config, class_images) as class_dir:
            learned = learning_check(model_dir, Path(subject_dir), class_dir, result.identifier, config)
        metrics.update(learned.metrics())
    baseline = None
    if config.evaluation.gate.against == "reference":  # scored whatever the thresholds say: it is the measurement
        baseline = evaluate_baseline(Path(subject_dir), config, Path(output_dir) / "reference", _images_progress(run, "reference"))
        metrics.update({f"reference/{name}": value for name, value in baseline.overall.items()})
    run.log_metrics(metrics, on_parent=True)
    run.log_dict(result.settings, "evaluation_config.json")
    protocol = evaluation_protocol(result.settings, config)
    run.set_tags({TAG_EVAL_PROTOCOL: protocol}, on_parent=True)
    run.log_table(
        {key: [getattr(score, key) for score in result.prompts] for key in ("prompt", "category", "dino", "clip_i", "clip_t", "div")},
        "eval_prompts.json",
    )
    for grid in sorted(Path(output_dir).glob("grid-*.png")):
        run.log_file(grid, "eval_grids")
    registered = None
    name = config.evaluation.registered_model.format(subject=config.subject.name)
    gate, comparison = result.gate, None  # comparison: against the champion or the baseline, said either way
    if gate.passed and config.evaluation.gate.against == "champion":
        comparison = champion_decision(result.overall, protocol, current_champion(run.tracking_uri, name), config.evaluation.gate)
        gate = result.gate = comparison  # what the report says
    if gate.passed and baseline is not None:
        comparison = baseline_decision(result.overall, baseline.overall, config.evaluation.gate)
        gate = result.gate = comparison
    if config.evaluation.safety_checker:  # said on the run either way; a flagged image keeps the model out
        safety = check_images(config.evaluation.safety_checker, Path(output_dir),
                               [name for score in result.prompts for name in score.image_files], config.evaluation.encoder_batch_size)
        run.set_tags({TAG_SAFETY: safety.describe()}, on_parent=True)
        if gate.passed and not safety.passed:
            gate = result.gate = comparison = GateDecision(False, [safety.describe()])
    if gate.passed:
        # Logged by the fine-tune stage; a model trained elsewhere is logged here first.
        model_uri = run.parent_tag(TAG_MODEL_URI) or log_pipeline_model(run.tracking_uri, run.run_id, Path(model_dir))
        version = register_candidate(
            run.tracking_uri, model_uri, name,
            {"identifier": result.identifier, "class_noun": result.class_noun, "subject_run": run.parent_run_id},
        )
        registered = f"{name}@candidate (version {version})"
        why = {TAG_GATE_REASON: "; ".join(gate.reasons)} if comparison else {}
        run.set_tags({TAG_GATE: "passed", TAG_REGISTERED: registered, TAG_REGISTERED_VERSION: version, **why}, on_parent=True)
    else:
        run.set_tags({TAG_GATE: "rejected", TAG_GATE_REASON: "; ".join(gate.reasons)}, on_parent=True)
    report = render_report(result, registered) + ("\n" + learned.markdown() if learned else "")
    (Path(output_dir) / "report.md").write_text(report)
    run.log_file(Path(output_dir) / "report.md", on_parent=True)
    flat = {key.removeprefix("eval/").replace("/", "_"): value for key, value in metrics.items()}
    title = f"{config.subject.name}: DreamBench evaluation"
    figures, grids = _grid_images(Path(output_dir), result.overall)
    verdict = f"gate passed, registered as {registered}" if registered else f"gate rejected: {'; '.join(gate.reasons)}"
    return EvaluationOutcome(metrics=flat, report_markdown=report, registered=registered,
                             page_html=image_page(title, grids, f"{figures}; {verdict}"))


@subject_stage(SUPER_RESOLUTION)
def super_resolution_task(config: RunConfig, run: StageRun, subject_dir: str, class_images: str, model_dir: str, output_dir: str,
                  page_path: str = "") -> str:
    """Fine-tune the upscaler on the subject; log its loss curves and a low-res / generic / personalised grid
    (also as an HTML page for KFP)."""
    from dreambooth.reports.pages import image_page, write_page
    from dreambooth.super_resolution import fine_tune_upscaler, upscale_comparison_grid
    from dreambooth.training.saving import release_checkpoints

    identifier = _identifier(Path(subject_dir))
    run.set_tags({
        TAG_SUPERRES_NOISE_LEVELS: str(list(config.superres.train_noise_levels)),
        TAG_SUPERRES_INFERENCE_NOISE_LEVEL: str(config.superres.inference_noise_level),
    })
    with _class_folder(config, class_images) as class_dir:
        result = _train(
            SUPER_RESOLUTION, fine_tune_upscaler, config.superres.training, run, config,
            Path(subject_dir), class_dir, identifier, Path(output_dir),
        )
    run.log_metrics({
        "superres_steps_per_second": result.steps_per_second,
        "superres_seconds": result.seconds,
        **{f"superres_final_{key}": value for key, value in result.final_loss.items()},
    }, on_parent=True)
    with tempfile.TemporaryDirectory() as scratch:
        grid = Path(scratch) / "superres-comparison.png"
        save_marked(upscale_comparison_grid(Path(subject_dir), Path(model_dir), Path(output_dir), identifier, config), grid,
                    payload_for(model_dir))
        run.log_file(grid, on_parent=True)
        if page_path:
            title = f"{config.subject.name}: low resolution, generic upscaler, personalised upscaler"
            write_page(page_path, image_page(title, [("super-resolution", grid)]), title)
    run.log_folder(Path(output_dir), "upscaler")
    release_checkpoints(result, config.superres.training.keep_checkpoints)
    return output_dir


@subject_stage(EVALUATE_UPSCALED)
def evaluate_upscaled_task(
    config: RunConfig, run: StageRun, model_dir: str, upscaler_dir: str, subject_dir: str, output_dir: str
) -> EvaluationOutcome:
    """Score the two-stage cascade with the generic and with the personalised upscaler."""
    from dreambooth.evaluation.evaluate import EvaluationInputs, evaluate_cascade

    if not config.evaluation.enabled:
        return _evaluation_disabled(run)

    from dreambooth.reports.pages import image_page

    names = ("dino", "clip_i", "clip_t", "div")
    metrics: dict[str, float] = {}
    page_images: list[tuple[str, Path]] = []
    lines = ["# DreamBench evaluation of the upscaled cascade", "", "| upscaler | resolution | DINO | CLIP-I | CLIP-T | DIV |", "|---|---|---|---|---|---|"]
    # The model's images are drawn once and upscaled by each upscaler, so the two differ in the upscaler alone.
    results = evaluate_cascade(model_dir, Path(subject_dir), EvaluationInputs.of(config), Path(output_dir),
                               {"generic": config.superres.base, "personalised": upscaler_dir},
                               on_progress=_images_progress(run, "generic and personalised upscalers"))
    for label, result in results.items():
        upscaler = result.settings["upscaler"]
        values = {name: result.overall[name] for name in names}
        metrics.update({f"eval/upscaled_{label}/{name}": value for name, value in values.items()})
        lines.append(
            f"| {label} (`{upscaler}`) | {result.settings['resolution']} px | " + " | ".join(f"{values[n]:.3f}" for n in names) + " |"
        )
        for grid in sorted((Path(output_dir) / label).glob("grid-*.png")):
            run.log_file(grid, f"eval_grids_{label}")
        figures, grids = _grid_images(Path(output_dir) / label, result.overall, f"{label} upscaler: ")
        page_images += [(f"{caption} ({figures})", grid) for caption, grid in grids]
    run.log_metrics(metrics, on_parent=True)
    report = "\n".join(lines) + "\n"
    (Path(output_dir) / "report.md").write_text(report)
    run.log_file(Path(output_dir) / "report.md", "upscaled")
    flat = {key.removeprefix("eval/").replace("/", "_"): value for key, value in metrics.items()}
    page_html = image_page(f"{config.subject.name}: the cascade, generic vs personalised upscaler", page_images)
    return EvaluationOutcome(metrics=flat, report_markdown=report, registered=None, page_html=page_html)


@task_entry
def priors_task(config_json: str, tracking_uri: str, batch_run_id: str, prior_key: str, output_dir: str, output_uri: str) -> dict:
    """Generate (or take the user's) class images for one prior group, under the batch run.

    Returns a PriorOutcome as a dict; a failure (a model that will not load, a missing folder of
    class images) is reported in it, so only the subjects of this group fail.
    """
    from dreambooth.priors import generate_class_priors

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    if not prior_key:  # no subject of this batch trains with prior preservation
        return asdict(PriorOutcome(prior_key))
    config = RunConfig.from_json(config_json)
    noun = config.subject.class_noun
    tags = {TAG_CLASS_NOUN: noun, TAG_PRIOR_KEY: prior_key, TAG_RUN_NAME: CLASS_PRIORS.run_name(noun)}
    try:
        with stage_run(tracking_uri, batch_run_id, CLASS_PRIORS, tags, **_run_settings(config)) as run:
            _apply_weights_policy(config, run)
            result = generate_class_priors(config, Path(output_dir), on_progress=_images_progress(run))
            run.set_tags({TAG_CLASS_PROMPT: result.class_prompt, TAG_PRIORS_SOURCE: result.source})
            _log_preview(run, Path(output_dir), result.class_prompt)
            run.log_metrics({
                "class_images": result.count,
                "class_images_generated": result.generated,
                "priors_seconds": result.seconds,
                "priors_images_per_second": result.images_per_second,
            })
    except InputError as error:
        print(f"error: class priors for {noun!r}: {error}", file=sys.stderr)
        return asdict(PriorOutcome(prior_key, error=str(error).splitlines()[0]))
    return asdict(PriorOutcome(prior_key, class_images=output_uri or output_dir, count=result.count))


def _log_preview(run: StageRun, class_dir: Path, class_prompt: str, count: int = 8) -> None:
    """A row of the first class images, so a glance in MLflow shows what the prior looks like."""
    from dreambooth.images import labelled_grid, list_images, load_rgb

    images = [(path.stem, load_rgb(path, 1 << 40).image) for path in list_images(class_dir)[:count]]
    if not images:
        return
    with tempfile.TemporaryDirectory() as scratch:
        preview = Path(scratch) / "class-priors-preview.png"
        labelled_grid([(class_prompt, images)]).save(preview)
        run.log_file(preview)
