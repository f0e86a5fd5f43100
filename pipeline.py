"""DreamBooth as a Kubeflow pipeline: the DAG, and the command line that compiles or runs it.

    ingest -> class priors -> fine-tune -> samples
                                       |-> evaluate          (quality gate, model registry)
                                       \-> super-resolution -> evaluate-upscaled   (when superres.enabled)
    an exit handler closes the MLflow run

    python pipeline.py compile --output dreambooth.yaml [--config sd15]
    python pipeline.py run --subject-dir DIR --class-noun NOUN [--config tiny] [--output-dir outputs]
    python pipeline.py ingest --subject-dir DIR --class-noun NOUN --output-dir DIR
    python pipeline.py evaluate --model DIR --subject-dir DIR --class-noun NOUN [--identifier TOKEN]
    python pipeline.py submit --host URL --config gke-sd15 --subject-uri gs://... --class-noun NOUN
    python pipeline.py schedule --host URL --cron "0 0 9 * * 1-5" --config gke-sd15 --subject-uri gs://... --class-noun NOUN
"""


# No `from __future__ import annotations` here: KFP reads the pipeline signature's real types.
import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional

from kfp import dsl

from components.class_priors import class_priors
from components.evaluate import evaluate
from components.evaluate_upscaled import evaluate_upscaled
from components.finetune import finetune
from components.finish_tracking import finish_tracking
from components.ingest import ingest
from components.platform import apply_cluster_settings
from components.samples import samples
from components.superres import superres
from dreambooth.config import ClusterSettings, RunConfig, load_config, require_subject
from dreambooth.errors import InputError

PIPELINE_NAME = "dreambooth"
DEFAULT_CONFIG = "sd15"
JOB_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER
JOB_NAME = dsl.PIPELINE_JOB_NAME_PLACEHOLDER


def build_pipeline(cluster: Optional[ClusterSettings] = None):
    """The DAG; with `cluster`, every task also carries its Kubernetes settings (image, GPUs, secrets...)."""

    @dsl.pipeline(name=PIPELINE_NAME, description="DreamBooth subject personalisation with prior preservation")
    def dreambooth_pipeline(config_json: str, subject_uri: str, tracking_uri: str, superres_enabled: bool = True):
        tracked = dict(config_json=config_json, tracking_uri=tracking_uri)
        close_run = finish_tracking(**tracked, job_id=JOB_ID)
        with dsl.ExitHandler(close_run, name="dreambooth-run"):
            job = dict(**tracked, job_id=JOB_ID, job_name=JOB_NAME)
            subject = ingest(**job, subject_uri=subject_uri)
            # After ingest: a bad upload must fail before any GPU time is spent on priors.
            priors = class_priors(**job).after(subject)
            tuned = finetune(
                **job,
                subject_images=subject.outputs["subject_images"],
                class_images=priors.outputs["class_images"],
            )
            sampled = samples(**job, model=tuned.outputs["model"])
            scored = evaluate(**job, model=tuned.outputs["model"], subject_images=subject.outputs["subject_images"])
            stages = {
                "finish-tracking": close_run, "ingest": subject, "class-priors": priors,
                "finetune": tuned, "samples": sampled, "evaluate": scored,
            }
            with dsl.If(superres_enabled == True, name="superres-enabled"):  # noqa: E712 (a KFP condition)
                upscaled = superres(
                    **job,
                    subject_images=subject.outputs["subject_images"],
                    class_images=priors.outputs["class_images"],
                    model=tuned.outputs["model"],
                )
                stages["superres"] = upscaled
                stages["evaluate-upscaled"] = evaluate_upscaled(
                    **job,
                    model=tuned.outputs["model"],
                    upscaler=upscaled.outputs["upscaler"],
                    subject_images=subject.outputs["subject_images"],
                )
        for stage, task in stages.items():
            task.set_caching_options(False)  # every task writes to MLflow: never skip it
            if cluster is not None:
                apply_cluster_settings(task, stage, cluster)

    return dreambooth_pipeline


# ---------------------------------------------------------------- command line


def _overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {"subject": {}, "model": {}, "priors": {}, "tracking": {}, "storage": {}}
    if getattr(args, "class_noun", None):
        overrides["subject"]["class_noun"] = args.class_noun
    if getattr(args, "identifier", None):
        overrides["subject"]["identifier"] = args.identifier
    if getattr(args, "subject_dir", None):
        overrides["subject"]["name"] = args.subject_dir.rstrip("/").rsplit("/", 1)[-1]
    if getattr(args, "subject_uri", None):
        overrides["subject"]["name"] = args.subject_name or args.subject_uri.rstrip("/").rsplit("/", 1)[-1]
    if getattr(args, "class_images", None):
        overrides["priors"]["class_images"] = str(Path(args.class_images).resolve())
    if getattr(args, "base_model", None):
        overrides["model"]["base"] = args.base_model
    if getattr(args, "tracking_uri", None):
        overrides["tracking"]["uri"] = args.tracking_uri
    if getattr(args, "output_dir", None) and args.command == "run":
        from dreambooth.storage import is_gcs
        from dreambooth.tiny_models import default_cache_dir

        # Prior caches and checkpoints stay on local disk, next to local outputs when there are some.
        local = default_cache_dir() if is_gcs(args.output_dir) else Path(args.output_dir).resolve()
        overrides["storage"]["work_dir"] = str(local / "work")
    return {section: values for section, values in overrides.items() if values}


def compile_pipeline(config: RunConfig, output: Path, subject_uri: str = "", tracking_uri: str = "") -> Path:
    from kfp import compiler

    compiler.Compiler().compile(
        build_pipeline(config.cluster),
        str(output),
        pipeline_parameters={
            "config_json": config.to_json(),
            "subject_uri": subject_uri,
            "tracking_uri": tracking_uri,
            "superres_enabled": config.superres.enabled,
        },
    )
    return output


def _latest_job_dir(pipeline_root: Path, before: set[Path]) -> Path:
    created = [p for p in pipeline_root.glob(f"{PIPELINE_NAME}-*") if p.is_dir() and p not in before]
    if not created:
        raise RuntimeError(f"{pipeline_root}: the local run wrote no job folder")
    return max(created, key=lambda p: p.stat().st_mtime)


def run_locally(config: RunConfig, subject: str, output: str) -> int:
    """Run the whole DAG through kfp.local; print where the model, grid and MLflow run are."""
    from dreambooth.storage import is_gcs

    if not is_gcs(output):
        return _run_locally(config, subject, Path(output))
    # kfp.local writes task outputs to a local pipeline root; results are published to GCS after.
    with tempfile.TemporaryDirectory(prefix="dreambooth-run-") as staging:
        return _run_locally(config, subject, Path(staging), publish_to=output.rstrip("/"))


def _run_locally(config: RunConfig, subject: str, output_dir: Path, publish_to: Optional[str] = None) -> int:
    from kfp import local

    from dreambooth.ingest import ingest_subject
    from dreambooth.storage import is_gcs, local_folder, upload_folder
    from dreambooth.tracking import TAG_ERROR, TAG_FAILED_STAGE, find_parent_run, resolve_tracking_uri

    # Refuse a bad upload here, in one line, before KFP starts any task.
    with tempfile.TemporaryDirectory() as scratch, local_folder(subject) as photos:
        ingest_subject(photos, Path(scratch), config)

    tracking_uri = resolve_tracking_uri(config.tracking.uri)
    pipeline_root = output_dir.resolve() / "kfp"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.glob(f"{PIPELINE_NAME}-*"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=False)
    build_pipeline()(  # kfp.local runs tasks as local processes: no cluster settings
        config_json=config.to_json(),
        subject_uri=subject if is_gcs(subject) else str(Path(subject).resolve()),
        tracking_uri=tracking_uri,
        superres_enabled=config.superres.enabled,
    )

    job_dir = _latest_job_dir(pipeline_root, before)
    parent = find_parent_run(tracking_uri, config.tracking.experiment, job_name=job_dir.name)
    model_dir = job_dir / "finetune" / "model"
    grid = job_dir / "samples" / "sample_images" / "samples-grid.png"
    report = job_dir / "evaluate" / "evaluation" / "report.md"
    upscaler_dir = job_dir / "superres" / "upscaler"
    print()
    print(f"job:          {job_dir.name}")
    if parent is not None:
        print(f"mlflow run:   {parent.info.run_id} ({tracking_uri}, experiment {config.tracking.experiment!r})")
        error = parent.data.tags.get(TAG_ERROR)
        if error:
            print(f"error: stage {parent.data.tags.get(TAG_FAILED_STAGE, '?')} failed: {error}", file=sys.stderr)
            return 1
    if not (model_dir / "model_index.json").is_file() or not grid.is_file():
        print(f"error: the pipeline did not finish; task logs are above, outputs under {job_dir}", file=sys.stderr)
        return 1
    if publish_to:
        destination = f"{publish_to}/{job_dir.name}"
        model_dir = upload_folder(model_dir, f"{destination}/model")
        grid = upload_folder(grid.parent, f"{destination}/samples") + f"/{grid.name}"
        if (upscaler_dir / "model_index.json").is_file():
            upscaler_dir = upload_folder(upscaler_dir, f"{destination}/upscaler")
        if report.is_file():
            report = upload_folder(report.parent, f"{destination}/evaluation") + "/report.md"
    print(f"model:        {model_dir}")
    print(f"sample grid:  {grid}")
    if str(upscaler_dir).startswith("gs://") or (Path(upscaler_dir) / "model_index.json").is_file():
        print(f"upscaler:     {upscaler_dir}")
    if str(report).startswith("gs://") or Path(report).is_file():
        print(f"evaluation:   {report}")
        print(f"quality gate: {_gate_line(parent)}")
    if tracking_uri.startswith("http") and parent is not None:
        print(f"mlflow ui:    {tracking_uri.rstrip('/')}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
    return 0


CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
CRON_RANGES = {0: (0, 59), 1: (0, 59), 2: (0, 23), 3: (1, 31), 4: (1, 12), 5: (0, 7)}


def validate_cron(expression: str) -> str:
    """KFP recurring runs take 6-field cron, seconds first; refuse anything else in one line."""
    import re

    fields = expression.split()
    example = "e.g. '0 0 9 * * 1-5' for 09:00 on weekdays"
    if len(fields) != 6:
        raise InputError(f"--cron: {expression!r} has {len(fields)} fields; KFP cron has 6, seconds first ({example})")
    for index, field in enumerate(fields):
        if not re.fullmatch(r"[0-9A-Za-z*?/,\-#LW]+", field):
            raise InputError(f"--cron: {CRON_FIELDS[index]} field {field!r} has characters cron does not use")
        low, high = CRON_RANGES[index]
        for number in re.findall(r"\d+", field.split("/")[0]):
            if not low <= int(number) <= high:
                raise InputError(f"--cron: {CRON_FIELDS[index]} {number} is outside {low}-{high} ({example})")
    return expression


def _run_parameters(config: RunConfig, subject_uri: str) -> dict:
    return {
        "config_json": config.to_json(),
        "subject_uri": subject_uri,
        "tracking_uri": config.tracking.uri or "",
        "superres_enabled": config.superres.enabled,
    }


def submit(config: RunConfig, host: str, experiment: str, subject_uri: str, run_name: Optional[str], cron: Optional[str]) -> int:
    """Compile with the cluster settings and create a run (or a recurring run) on a KFP v2 host."""
    import kfp

    if config.cluster is None:
        raise InputError(f"config {config.name!r}: no `cluster` section; submit a cluster config (e.g. --config gke-sd15)")
    if cron is not None:
        validate_cron(cron)
    client = kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(config, Path(scratch) / "dreambooth.yaml")
        parameters = _run_parameters(config, subject_uri)
        account = config.cluster.service_account or ""
        name = run_name or f"dreambooth-{config.subject.name}-{config.subject.class_noun}"
        if cron is None:
            result = client.create_run_from_pipeline_package(
                str(package), arguments=parameters, run_name=name, experiment_name=experiment, service_account=account
            )
            print(f"run:          {result.run_id}")
            print(f"url:          {host.rstrip('/')}/#/runs/details/{result.run_id}")
            return 0
        experiment_id = client.create_experiment(experiment).experiment_id
        recurring = client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=cron, pipeline_package_path=str(package),
            params=parameters, service_account=account,
        )
        print(f"recurring run: {recurring.recurring_run_id} ({cron})")
        print(f"url:           {host.rstrip('/')}/#/recurringrun/details/{recurring.recurring_run_id}")
        return 0


def _gate_line(parent) -> str:
    from dreambooth.tracking import TAG_GATE, TAG_GATE_REASON

    tags = parent.data.tags if parent is not None else {}
    if tags.get(TAG_GATE) == "passed":
        return f"passed, registered as {tags.get('dreambooth.registered_model')}"
    return f"rejected ({tags.get(TAG_GATE_REASON, 'see the report')})"


def evaluate_only(config: RunConfig, model: str, subject_dir: Path, output_dir: Path) -> int:
    """Score a model trained anywhere (diffusers folder or hub id), tracked as its own MLflow run."""
    import time

    from dreambooth.tasks import evaluate_task, finish_task
    from dreambooth.tracking import find_parent_run, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(config.tracking.uri)
    job_id = f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    outcome = evaluate_task(config.to_json(), tracking_uri, job_id, job_id, model, str(subject_dir), str(output_dir))
    finish_task(config.to_json(), tracking_uri, job_id, "SUCCEEDED")
    parent = find_parent_run(tracking_uri, config.tracking.experiment, job_id=job_id)
    print(outcome.report_markdown)
    print(f"report:       {output_dir / 'report.md'}")
    print(f"mlflow run:   {parent.info.run_id if parent else '?'} ({tracking_uri})")
    print(f"quality gate: {_gate_line(parent)}")
    return 0


def _ingest_only(config: RunConfig, subject: str, output_dir: Path) -> int:
    from dreambooth.ingest import ingest_subject
    from dreambooth.storage import local_folder

    with local_folder(subject) as photos:
        result = ingest_subject(photos, output_dir, config)
    print(json.dumps(result.as_manifest(), indent=2))
    print(f"\n{len(result.images)} images ready in {output_dir}; identifier {result.identifier.identifier!r}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", default=DEFAULT_CONFIG, help="config name under configs/ or a YAML path")
        sub.add_argument("--base-model", help="hub id, local diffusers folder or tiny://sd (overrides model.base)")
        return sub

    def with_subject(sub: argparse.ArgumentParser, output_required: bool = False) -> argparse.ArgumentParser:
        sub.add_argument("--subject-dir", required=True, help="folder (or gs://bucket/prefix) of 3-5 photos of the subject")
        sub.add_argument("--class-noun", required=True, help="what the subject is: dog, backpack, teapot ...")
        sub.add_argument("--identifier", help="use this token as [V] instead of choosing a rare one (e.g. sks)")
        sub.add_argument("--output-dir", required=output_required, default=None if output_required else "outputs",
                         help="where results go: a folder, or gs://bucket/prefix for run")
        return sub

    compile_cmd = with_config(commands.add_parser("compile", help="write the KFP pipeline YAML"))
    compile_cmd.add_argument("--output", type=Path, default=Path("dreambooth.yaml"))
    compile_cmd.add_argument("--tracking-uri", help="MLflow tracking URI baked in as the default parameter")

    run_cmd = with_subject(with_config(commands.add_parser("run", help="run the whole pipeline locally (kfp.local)")))
    run_cmd.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    run_cmd.add_argument("--class-images", type=Path, help="your own class images for prior preservation (skips generating them)")

    with_subject(with_config(commands.add_parser("ingest", help="validate and normalise an upload only")), True)

    for command, text in (("submit", "compile and create a run on a KFP host"), ("schedule", "create a recurring run")):
        cluster_cmd = with_config(commands.add_parser(command, help=text))
        cluster_cmd.add_argument("--host", required=True, help="the KFP API endpoint, e.g. https://kfp.example.com/pipeline")
        cluster_cmd.add_argument("--experiment", default="dreambooth")
        cluster_cmd.add_argument("--subject-uri", required=True, help="the subject photos as the cluster sees them (gs://...)")
        cluster_cmd.add_argument("--subject-name", help="label for runs and tags (default: the URI's last part)")
        cluster_cmd.add_argument("--class-noun", required=True)
        cluster_cmd.add_argument("--identifier")
        cluster_cmd.add_argument("--run-name")
        if command == "schedule":
            cluster_cmd.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 9 * * 1-5'")

    evaluate_cmd = with_subject(with_config(commands.add_parser("evaluate", help="score a trained model by the DreamBench protocol")))
    evaluate_cmd.add_argument("--model", required=True, help="the personalised model: a diffusers folder or hub id")
    evaluate_cmd.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, _overrides(args))
        if args.command == "compile":
            path = compile_pipeline(config, args.output, tracking_uri=config.tracking.uri or "")
            print(f"wrote {path} (config {config.name!r})")
            return 0
        require_subject(config)
        if args.command in ("submit", "schedule"):
            cron = args.cron if args.command == "schedule" else None
            return submit(config, args.host, args.experiment, args.subject_uri, args.run_name, cron)
        if args.command == "ingest":
            return _ingest_only(config, args.subject_dir, Path(args.output_dir))
        if args.command == "evaluate":
            return evaluate_only(config, args.model, args.subject_dir, Path(args.output_dir) / "evaluation")
        return run_locally(config, args.subject_dir, args.output_dir)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
