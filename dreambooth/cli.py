"""The command line: `dreambooth ...` (installed), or `python pipeline.py ...` in a checkout.

    compile   write the KFP pipeline YAML
    run       run the whole pipeline locally (kfp.local) on a subjects file or one subject folder
    ingest    validate and normalise one upload only
    evaluate  score a model trained anywhere by the DreamBench protocol
    submit    compile and create a run on a KFP host       schedule  create or replace a recurring run, by name
    schedules list, pause, resume or delete the recurring runs, by name
    preflight check in seconds what would fail after GPU time (run, experiment, submit and schedule run it first)
    warm-cache  download every model a run loads into the caches (the cluster's model-cache Job)
    experiment  the paper's comparisons and ablations: subjects x variants as one batch, and its tables
    compare   put runs side by side: a table, plots and an image sheet
    sync-tracking  send the step metrics stages kept on disk while MLflow was unreachable
    models    the registered subject models: versions, aliases, headline figures
    promote   point an alias (champion) at a reviewed version, with the reviewer's note
    watermark check IMAGE  read the invisible mark the project puts on every image it draws
    forget    remove a subject's photos and everything made from them, and keep it from training again
    components  write each stage's KFP component spec (components/<stage>/component.yaml) for your own pipelines
    configs   list the shipped configs          config show  print a config as it resolves (extends: and defaults)

Bad input or settings end in lines that name the file or setting and the reason, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from dreambooth.dag.kfp_runs import COOKIES_ENV, TOKEN_ENV, TOKEN_FILE_ENV
from dreambooth.config import RunConfig, load_config
from dreambooth.errors import InputError
from dreambooth.process import configure_process, unwinding
from dreambooth.catalogue.subjects import SubjectEntry, entries_to_json, subject_config, validate_entries

DEFAULT_CONFIG = "sd15"
DEBUG_ENV = "DREAMBOOTH_DEBUG"  # set: an unexpected failure shows its traceback instead of one line


def _overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {"model": {}, "priors": {}, "tracking": {}, "storage": {}}
    if getattr(args, "class_images", None):
        overrides["priors"]["class_images"] = str(Path(args.class_images).resolve())
    if getattr(args, "base_model", None):
        overrides["model"]["base"] = args.base_model
    if getattr(args, "tracking_uri", None):
        overrides["tracking"]["uri"] = args.tracking_uri
    if getattr(args, "output_dir", None) and args.command in ("run", "experiment", "sync-tracking", "forget"):
        from dreambooth.storage import is_gcs
        from dreambooth.models.cache import default_cache_dir

        # Prior caches and checkpoints stay on local disk, next to local outputs when there are some.
        local = default_cache_dir() if is_gcs(args.output_dir) else Path(args.output_dir).resolve()
        overrides["storage"]["work_dir"] = str(local / "work")
    return {section: values for section, values in overrides.items() if values}


def _without_credentials(config: RunConfig) -> RunConfig:
    """A tracking URI's `user:password@` never travels: locally it moves to MLflow's own variables;
    a cluster's pods take them from a Kubernetes Secret instead."""
    from dreambooth.tracking import adopt_credentials, has_credentials

    uri = config.tracking.uri
    if not uri or not has_credentials(uri):
        return config
    if config.cluster is not None:
        raise InputError(
            "tracking.uri: holds credentials, which would be written into the compiled pipeline; leave them out "
            "and give the pods MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from a Kubernetes Secret (cluster.secrets)"
        )
    return config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": adopt_credentials(uri)})})


def _one_subject(args: argparse.Namespace, photos: str, config: RunConfig) -> SubjectEntry:
    """A single subject from the command line, checked like an entry of a subjects file."""
    if args.identifier is not None and not args.identifier.strip():
        raise InputError("--identifier: empty; leave it out to pick a rare token, or give one (e.g. sks)")
    from dreambooth.archives import ARCHIVE_SUFFIXES

    folder_name = photos.rstrip("/").rsplit("/", 1)[-1]
    for suffix in ARCHIVE_SUFFIXES:  # dog.zip: the subject "dog"
        folder_name = folder_name.removesuffix(suffix)
    subject_id = getattr(args, "subject_name", None) or folder_name
    raw = {"id": subject_id, "photos": photos, "class_noun": args.class_noun, "identifier": args.identifier}
    return validate_entries([("the command line", raw)], "subject", config)[0]


def _local_photos(path: str) -> str:
    from dreambooth.storage import is_gcs

    return path if is_gcs(path) else str(Path(path).resolve())


def _local_preflight(args: argparse.Namespace, config: RunConfig, subjects_uri: Optional[str] = None,
                     subject_uri: Optional[str] = None) -> None:
    """A local run's cheap checks before anything costly starts: the models, the tracking store, the
    subjects' photos and whether this machine can train the model; each failure is a line of its own."""
    from dreambooth.commands.preflight import run_preflight

    if args.skip_preflight:
        return
    failed = [check for check in run_preflight(config, subjects_uri=subjects_uri, subject_uri=subject_uri, local=True,
                                               allow_cpu=args.allow_cpu) if not check.ok]
    if failed:
        raise InputError("\n".join(f"{check.name}: {check.detail}" for check in failed))


def _run(args: argparse.Namespace, config: RunConfig) -> int:
    from dreambooth.commands.local_run import run_locally
    from dreambooth.catalogue.subjects import read_subjects

    if args.subjects:
        uri = _local_photos(args.subjects)
        entries = read_subjects(uri, config)  # every problem of the file, before any task starts
        _local_preflight(args, config, subjects_uri=uri)
        forgotten = _forgotten(config, entries)
        return run_locally(config, args.output_dir, [entry for entry in entries if entry.id not in forgotten], subjects_uri=uri,
                           force=args.force, verbose=args.verbose)
    if not (args.subject_dir and args.class_noun):
        raise InputError("run: give --subjects FILE, or --subject-dir DIR with --class-noun NOUN")
    entry = _one_subject(args, _local_photos(args.subject_dir), config)
    _local_preflight(args, config)
    _ingest(subject_config(config, entry), entry.photos, None)  # a bad upload fails here, in one line, before any store opens
    if _forgotten(config, [entry]):
        raise InputError(f"--subject-name: {entry.id!r} was forgotten (dreambooth forget) and is not trained again")
    return run_locally(config, args.output_dir, [entry], subjects_json=entries_to_json([entry]), force=args.force,
                       verbose=args.verbose)


def _forgotten(config: RunConfig, entries: list[SubjectEntry]) -> set[str]:
    from dreambooth.catalogue.forgotten import forgotten_ids
    from dreambooth.tracking import resolve_tracking_uri

    return forgotten_ids(resolve_tracking_uri(config.tracking.uri), config.tracking.experiment, [entry.id for entry in entries])


def _ingest(config: RunConfig, photos: str, output_dir: Optional[Path]):
    from dreambooth.storage import local_folder

    with tempfile.TemporaryDirectory() as scratch, local_folder(photos) as folder:
        if not folder.is_dir():  # said before ingest's imports (tokenizers, torch: seconds) load
            raise InputError(f"{photos}: subject folder not found")
        from dreambooth.ingest.photos import ingest_subject

        return ingest_subject(folder, output_dir or Path(scratch), config)


def _ingest_only(args: argparse.Namespace, config: RunConfig) -> int:
    entry = _one_subject(args, args.subject_dir, config)
    result = _ingest(subject_config(config, entry), entry.photos, Path(args.output_dir))
    print(json.dumps(result.as_manifest(), indent=2))
    print(f"\n{len(result.images)} images ready in {args.output_dir}; identifier {result.identifier.identifier!r}")
    return 0


def _evaluate_only(args: argparse.Namespace, shared: RunConfig) -> int:
    """Score a model trained anywhere (diffusers folder or hub id), tracked as a batch of one."""
    from dreambooth.reports.summary import subject_row
    from dreambooth.tasks.subject import evaluate_task
    from dreambooth.tracking import TAG_MODEL_LOCATION, client, close_batch_run_of_job, open_batch_run, open_subject_run

    from dreambooth.models.loading import describe_model_source

    entry = _one_subject(args, args.subject_dir, shared)
    describe_model_source(args.model, None, "--model")  # a folder that is not here, an unknown hub id: before any run opens
    tracking_uri = _tracking_store(shared, create=True)
    config = subject_config(shared, entry)
    job_id = f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    batch_run_id = open_batch_run(tracking_uri, shared, job_id, job_id)
    subject_run_id = open_subject_run(tracking_uri, batch_run_id, config, fingerprint="")
    client(tracking_uri).set_tag(subject_run_id, TAG_MODEL_LOCATION, args.model)
    output_dir = Path(args.output_dir) / "evaluation"
    outcome = None
    try:
        outcome = evaluate_task(config.to_json(), tracking_uri, subject_run_id, args.model, args.subject_dir, str(output_dir))
    finally:  # a crash, Ctrl-C or SIGTERM too: no run is left RUNNING, the reason is on each
        unwinding()
        row = subject_row(tracking_uri, subject_run_id, close=True)
        close_batch_run_of_job(tracking_uri, shared.tracking.experiment, job_id, "SUCCEEDED" if outcome else "FAILED", row.reason)
    if outcome is None:
        return 1
    print(outcome.report_markdown)
    print(f"report:       {output_dir / 'report.md'}")
    print(f"mlflow run:   {subject_run_id} ({tracking_uri})")
    print(f"quality gate: {'passed, registered as ' + row.registered if row.gate == 'passed' else 'rejected (' + row.reason + ')'}")
    return 0


def _subjects_argument(args: argparse.Namespace, config: RunConfig) -> tuple[dict, str]:
    """A cluster run's subject parameters and default run name, from --subjects-uri or --subject-uri."""
    from dreambooth.dag.kfp_runs import run_parameters

    if args.subjects_uri:
        name = f"dreambooth-{args.subjects_uri.rstrip('/').rsplit('/', 1)[-1].rsplit('.', 1)[0]}"
        return run_parameters(config, subjects_uri=args.subjects_uri, force=args.force), name
    if args.subject_uri and args.class_noun:
        entry = _one_subject(args, args.subject_uri, config)
        return run_parameters(config, subjects_json=entries_to_json([entry]), force=args.force), f"dreambooth-{entry.id}-{entry.class_noun}"
    raise InputError(f"{args.command}: give --subjects-uri URI, or --subject-uri URI with --class-noun NOUN")


def _kfp_target(args: argparse.Namespace, config: RunConfig):
    from dreambooth.dag.kfp_runs import KfpTarget

    if not getattr(args, "host", None):
        return None
    namespace = args.namespace or (config.cluster.namespace if config.cluster else None)
    return KfpTarget(args.host, namespace, args.token_file)


def _preflight(args: argparse.Namespace, config: RunConfig) -> bool:
    from dreambooth.commands.preflight import report, run_preflight

    checks = run_preflight(config, _kfp_target(args, config), args.mlflow_via, args.subjects_uri, args.subject_uri)
    return report(checks)


def _submit(args: argparse.Namespace, config: RunConfig) -> int:
    from dreambooth.commands.submit import check_submission, submit

    cron = args.cron if args.command == "schedule" else None
    check_submission(config, cron)
    parameters, name = _subjects_argument(args, config)
    if not args.skip_preflight and not _preflight(args, config):
        raise InputError(f"{args.command}: preflight failed (above); nothing was submitted. Fix it, or pass --skip-preflight")
    wait = args.wait if args.command in ("submit", "experiment") else None
    return submit(config, _kfp_target(args, config), args.experiment, parameters, args.run_name or name,
                  cron, wait, args.mlflow_via)


def _experiment(args: argparse.Namespace, config: RunConfig) -> int:
    """An experiment file through `run` (locally) or `submit` (with --host: the file as the cluster sees it)."""
    from dreambooth.storage import is_gcs, read_text
    from dreambooth.catalogue.subjects import parse_subjects

    if args.host and not is_gcs(args.file):
        raise InputError(f"experiment: {args.file} is on this machine; with --host give the file where the cluster reads it (gs://...)")
    source = args.file if args.host else _local_photos(args.file)
    entries = parse_subjects(read_text(source), source, config)  # every problem of the file, before anything runs
    if not any(entry.experiment for entry in entries):
        raise InputError(f"{args.file}: no `variants:`; an experiment runs each subject once per variant "
                         "(for subjects alone: run --subjects)")
    if args.host:
        args.subjects_uri, args.subject_uri = source, None
        return _submit(args, config)
    _local_preflight(args, config, subjects_uri=source)
    from dreambooth.commands.local_run import run_locally

    return run_locally(config, args.output_dir, entries, subjects_uri=source, force=args.force, verbose=args.verbose)


def _warm_cache(args: argparse.Namespace, config: RunConfig) -> int:
    from dreambooth.models.loading import fetch_model, models_in_use

    failed = 0
    for use in models_in_use(config):
        try:
            print(f"ready  {use.setting:<24} {fetch_model(use)}", flush=True)
        except InputError as error:
            failed += 1
            print(f"FAIL   {use.setting:<24} {error}", flush=True)
    return 1 if failed else 0


def _sync_tracking(args: argparse.Namespace, config: RunConfig) -> int:
    """Send the step metrics stages kept on disk while MLflow was unreachable."""
    from dreambooth.tracking import SPOOL_FOLDER
    from dreambooth.tracking.spool import sync_spooled

    folder = Path(config.storage.work_dir) / SPOOL_FOLDER
    outcomes = sync_spooled(folder)
    for outcome in outcomes:
        print(f"{'FAIL' if outcome.error else 'sent'}   run {outcome.run_id}: " + (outcome.error or f"{outcome.sent} step metrics"))
    if not outcomes:
        print(f"nothing to send: {folder} holds no step metrics")
    return 1 if any(outcome.error for outcome in outcomes) else 0


def _tracking_store(config: RunConfig, create: bool = False) -> str:
    """The tracking URI, checked before any MLflow call: a server that does not answer is one line naming it
    (not minutes of retries); a command that only reads (create=False) never makes a store where none is."""
    from dreambooth.tracking.store import check_store

    return check_store(config.tracking.uri, create)


def _forget(args: argparse.Namespace, config: RunConfig) -> int:
    """Say what of the subject would go; with --yes (or a yes at the prompt), remove it."""
    from dreambooth.commands.forget import forget_subject

    tracking_uri = _tracking_store(config)
    found = forget_subject(args.subject, config, args.output_dir, tracking_uri, erase=False)
    print(f"{args.subject}: " + "; ".join(found.removed) + " to remove")
    for line in found.redacted:
        print(f"  without it: {line}")
    for line in found.unreachable:
        print(f"  out of reach: {line}")
    if not args.yes:
        if not sys.stdin.isatty():
            print("nothing removed: pass --yes to remove all of this")
            return 1
        if input(f"remove everything of {args.subject!r} listed above? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    done = forget_subject(args.subject, config, args.output_dir, tracking_uri, erase=True)
    print(f"removed: {'; '.join(done.removed)}")
    for line in done.redacted:
        print(f"rewritten without it: {line}")
    for line in done.notes:
        print(f"note: {line}")
    print(f"{args.subject}: forgotten; later batches skip it while a subjects file still lists it (class priors are shared and stay)")
    if done.unreachable:
        for line in done.unreachable:
            print(f"error: not removed, out of reach from here: {line}", file=sys.stderr)
        return 1
    return 0


def _compare(args: argparse.Namespace, config: RunConfig) -> int:
    from dreambooth.reports.compare import compare_runs

    selections = [bool(args.batch_run), bool(args.experiment), bool(args.runs)]
    if sum(selections) != 1:
        raise InputError("compare: give exactly one of --batch-run ID, --experiment NAME, --runs ID,ID,...")
    runs = [run.strip() for run in args.runs.split(",") if run.strip()] if args.runs else None
    return compare_runs(
        _tracking_store(config), Path(args.output_dir),
        batch_run=args.batch_run, experiment=args.experiment, run_ids=runs, force=args.force,
    )


def _promote(args: argparse.Namespace, config: RunConfig) -> int:
    import getpass

    from dreambooth.tracking.registry import promote

    version, before = promote(_tracking_store(config), args.model, args.to, args.version, args.alias,
                              args.note, os.environ.get("USER") or getpass.getuser())
    was = f" (was version {before})" if before and before != version else ""
    print(f"{args.model}@{args.to}: version {version}{was}" + (f"; note kept on version {version}" if args.note else ""))
    return 0


def _models(args: argparse.Namespace, config: RunConfig) -> int:
    from dreambooth.tracking.registry import registered_versions

    versions = registered_versions(_tracking_store(config), args.name)
    if not versions:
        print("no registered models yet: a subject that passes the quality gate is registered as <name>@candidate")
    shown = None
    for version in versions:
        if version.name != shown:
            print(version.name)
            shown = version.name
        aliases = " ".join(f"@{alias}" for alias in version.aliases)
        note = f'  "{version.note}"' if version.note else ""
        print(f"  version {version.version:<4} {aliases:<24} {version.figures():<48} run {version.subject_run}{note}".rstrip())
    return 0


def _compile(args: argparse.Namespace, config: RunConfig) -> int:
    """What `submit` would send for this config: a cluster config compiles with its Kubernetes settings
    (the launcher for a sharded one, unless --dag), and what submit refuses is refused here too."""
    from dreambooth.commands.submit import check_submission, compile_pipeline, unresolved_placeholders
    from dreambooth.config_files import resolve_config_path

    if not args.output.parent.is_dir():
        raise InputError(f"--output: {args.output.parent} is not a folder here; create it, or write elsewhere")
    on_cluster = config.cluster is not None
    if not on_cluster and args.launcher:
        raise InputError(f"--launcher: config {config.name!r} has no `cluster` section; the launcher starts shards on a cluster")
    if on_cluster:
        check_submission(config)
        found = [] if args.allow_placeholders else unresolved_placeholders(config)
        if found:
            source = resolve_config_path(_config_name(args))
            raise InputError("\n".join(f"{source}: {problem}; set your own (or --allow-placeholders for a dry compile)"
                                        for problem in found))
    launcher = on_cluster and not args.dag and (args.launcher or bool(config.batch.max_subjects_per_run))
    path = compile_pipeline(config, args.output, on_cluster=on_cluster, launcher=launcher)
    shape = "the sharded batch's launcher, as submit sends it for a subjects file" if launcher else "the DAG"
    print(f"wrote {path} (config {config.name!r}: {shape})")
    return 0


def _preflight_command(args: argparse.Namespace, config: RunConfig) -> int:
    return 0 if _preflight(args, config) else 1


def _components(args: argparse.Namespace, config: None) -> int:
    from dreambooth.dag.specs import write_component_specs

    if args.output.exists() and not args.output.is_dir():
        raise InputError(f"--output: {args.output} is a file; give a folder (one sub-folder per stage is written in it)")
    written = write_component_specs(args.output)
    print(f"wrote {len(written)} component specs under {args.output}/ (one folder per stage: component.yaml, README.md)")
    return 0


def _with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--config", help=f"a shipped config's name (tiny, sd15, gke-sd15...: `dreambooth configs`) or a YAML path "
                                      f"(default: {DEFAULT_CONFIG}; run and experiment: only on a machine with CUDA)")
    sub.add_argument("--base-model", help="hub id, local diffusers folder or tiny://sd (overrides model.base)")
    return sub


def _with_subject(sub: argparse.ArgumentParser, required: bool = True) -> argparse.ArgumentParser:
    sub.add_argument("--subject-dir", required=required, help="folder, .zip or .tar (local or gs://) of 3-5 photos of the subject")
    sub.add_argument("--class-noun", required=required, help="what the subject is: dog, backpack, teapot ...")
    sub.add_argument("--identifier", help="use this token as [V] instead of choosing a rare one (e.g. sks)")
    sub.add_argument("--subject-name", help="the subject's id for runs and models (default: the folder's name)")
    return sub


def _with_local_checks(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--skip-preflight", action="store_true", help="start without checking models, MLflow and photos first")
    sub.add_argument("--allow-cpu", action="store_true", help="train a real model on a machine without CUDA (hours to days)")
    return sub


def _with_tracking(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db in the folder you run from)")
    return sub


def _with_tracking_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--config", help="only for tracking settings")
    return _with_tracking(sub)


def _with_cluster_target(sub: argparse.ArgumentParser, host_required: bool) -> argparse.ArgumentParser:
    sub.add_argument("--host", required=host_required, help="the KFP API endpoint, e.g. https://kfp.example.com/pipeline")
    sub.add_argument("--namespace", help="the Kubeflow profile namespace (default: cluster.namespace)")
    sub.add_argument("--token-file", help=f"a service-account token file (default: ${TOKEN_FILE_ENV}); or set ${TOKEN_ENV} / ${COOKIES_ENV}")
    sub.add_argument("--mlflow-via", help="reach MLflow here (e.g. a port-forward, http://localhost:5000) while sending the configured host name")
    sub.add_argument("--subjects-uri", help="a subjects file as the cluster sees it (gs://...); read when each run starts")
    sub.add_argument("--subject-uri", help="one subject's photos as the cluster sees them (gs://...)")
    sub.add_argument("--subject-name", help="the subject's id (default: the URI's last part)")
    sub.add_argument("--class-noun", help="with --subject-uri: what the subject is (dog, backpack ...)")
    sub.add_argument("--identifier", help="with --subject-uri: use this token as [V] instead of choosing a rare one")
    return sub


def _add_local_commands(commands) -> None:
    """compile, run, ingest, evaluate and experiment: a pipeline, or one stage, on this machine."""
    compile_cmd = _with_tracking(_with_config(commands.add_parser("compile", help="write the KFP pipeline YAML")))
    compile_cmd.add_argument("--output", type=Path, default=Path("dreambooth.yaml"), help="the pipeline YAML to write (default: dreambooth.yaml)")
    shape = compile_cmd.add_mutually_exclusive_group()
    shape.add_argument("--launcher", action="store_true",
                       help="the sharded batch's launcher (the default for a config with batch.max_subjects_per_run)")
    shape.add_argument("--dag", action="store_true", help="the DAG itself (what submit sends for one --subject-uri)")
    compile_cmd.add_argument("--allow-placeholders", action="store_true",
                             help="compile a cluster config whose image digest, PROJECT or BUCKET are still the shipped placeholders")
    compile_cmd.set_defaults(handler=_compile)

    run_cmd = _with_tracking(_with_subject(_with_config(commands.add_parser("run", help="run the pipeline locally (kfp.local)")), required=False))
    run_cmd.add_argument("--subjects", help="a subjects file (YAML or CSV, local or gs://): many subjects in one batch")
    run_cmd.add_argument("--output-dir", default="outputs", help="where results go: a folder, or gs://bucket/prefix (default: ./outputs)")
    run_cmd.add_argument("--class-images", type=Path, help="your own class images for prior preservation (skips generating them)")
    run_cmd.add_argument("--force", action="store_true", help="train every subject, even those already up to date")
    run_cmd.add_argument("--verbose", action="store_true", help="stream every task's whole output (kfp.local's), not one line per stage")
    _with_local_checks(run_cmd)
    run_cmd.set_defaults(handler=_run)

    ingest_cmd = _with_subject(_with_config(commands.add_parser("ingest", help="validate and normalise one upload only")))
    ingest_cmd.add_argument("--output-dir", required=True)
    ingest_cmd.set_defaults(handler=_ingest_only)

    evaluate_cmd = _with_tracking(_with_subject(_with_config(commands.add_parser("evaluate", help="score a trained model by the DreamBench protocol"))))
    evaluate_cmd.add_argument("--model", required=True, help="the personalised model: a diffusers folder or hub id")
    evaluate_cmd.add_argument("--output-dir", default="outputs", help="where the report and images go (default: ./outputs)")
    evaluate_cmd.set_defaults(handler=_evaluate_only)

    experiment_cmd = _with_tracking(_with_config(commands.add_parser(
        "experiment", help="subjects x variants as one batch (locally, or on a cluster with --host), and the paper's tables")))
    experiment_cmd.add_argument("file", help="an experiment file: `subjects:` as a subjects file, and `variants:` (local or gs://)")
    experiment_cmd.add_argument("--output-dir", default="outputs", help="where results go (local runs): a folder, or gs://bucket/prefix (default: ./outputs)")
    experiment_cmd.add_argument("--force", action="store_true", help="train every variant, even those already up to date")
    experiment_cmd.add_argument("--verbose", action="store_true", help="stream every task's whole output (local runs)")
    experiment_cmd.add_argument("--host", help="submit to this KFP endpoint instead of running locally (FILE as the cluster sees it)")
    experiment_cmd.add_argument("--namespace", help="the Kubeflow profile namespace (default: cluster.namespace)")
    experiment_cmd.add_argument("--token-file", help=f"a service-account token file (default: ${TOKEN_FILE_ENV}); or set ${TOKEN_ENV} / ${COOKIES_ENV}")
    experiment_cmd.add_argument("--mlflow-via", help="reach MLflow here while sending the configured host name (preflight)")
    experiment_cmd.add_argument("--experiment", default="dreambooth", help="the KFP experiment (with --host)")
    experiment_cmd.add_argument("--run-name", help="the KFP run's name (default: from the file's name)")
    experiment_cmd.add_argument("--skip-preflight", action="store_true", help="start without checking models, MLflow and photos first")
    experiment_cmd.add_argument("--allow-cpu", action="store_true", help="train a real model on a machine without CUDA (local runs)")
    experiment_cmd.add_argument("--wait", type=int, nargs="?", const=24 * 3600, metavar="SECONDS", help="follow the submitted run to its end")
    experiment_cmd.set_defaults(handler=_experiment)


def _add_cluster_commands(commands) -> None:
    """preflight, warm-cache, submit and schedule: a run on a KFP host, and what it needs there."""
    _with_tracking(_with_cluster_target(_with_config(commands.add_parser(
        "preflight", help="check models, MLflow, bucket, image and KFP in seconds, before any GPU time")), host_required=False)
    ).set_defaults(handler=_preflight_command)
    _with_config(commands.add_parser("warm-cache", help="download every model the config loads into the caches")).set_defaults(handler=_warm_cache)

    for command, text in (("submit", "compile and create a run on a KFP host"), ("schedule", "create a recurring run, or replace the one of the same name")):
        cluster_cmd = _with_cluster_target(_with_config(commands.add_parser(command, help=text)), host_required=True)
        cluster_cmd.add_argument("--experiment", default="dreambooth", help="the KFP experiment the run goes in (default: dreambooth)")
        cluster_cmd.add_argument("--run-name", help="the KFP run's name (default: from the subjects file or the subject)")
        cluster_cmd.add_argument("--force", action="store_true", help="train every subject, even those already up to date")
        cluster_cmd.add_argument("--skip-preflight", action="store_true", help="submit without checking models, MLflow, bucket and KFP first")
        if command == "schedule":
            cluster_cmd.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 9 * * 1-5'; run again with "
                                                                   "the same --run-name, it replaces that schedule")
        else:
            cluster_cmd.add_argument("--wait", type=int, nargs="?", const=24 * 3600, metavar="SECONDS",
                                     help="follow the run to its end (at most SECONDS, default a day); exit 0 only if it succeeded")
        cluster_cmd.set_defaults(handler=_submit)

    schedules_cmd = _with_config(commands.add_parser("schedules", help="list, pause, resume or delete schedules by name"))
    schedules_cmd.add_argument("action", choices=["list", "pause", "resume", "delete"],
                               help="list the experiment's schedules, or pause, resume or delete the one named --name")
    schedules_cmd.add_argument("--name", help="the schedule (its --run-name when it was made)")
    schedules_cmd.add_argument("--host", required=True, help="the KFP API endpoint, e.g. https://kfp.example.com/pipeline")
    schedules_cmd.add_argument("--namespace", help="the Kubeflow profile namespace (default: cluster.namespace)")
    schedules_cmd.add_argument("--token-file", help=f"a service-account token file (default: ${TOKEN_FILE_ENV}); or set ${TOKEN_ENV} / ${COOKIES_ENV}")
    schedules_cmd.add_argument("--experiment", default="dreambooth", help="the KFP experiment (default: dreambooth)")
    schedules_cmd.set_defaults(handler=_schedules)


def _schedules(args: argparse.Namespace, config: RunConfig) -> int:
    """list, pause, resume or delete the schedules (recurring runs) of a KFP experiment, by name."""
    from dreambooth.commands.schedules import change_schedule, list_schedules

    if args.action != "list" and not args.name:
        raise InputError(f"schedules {args.action}: give --name NAME (dreambooth schedules list shows them)")
    target = _kfp_target(args, config)
    multi_user = target.multi_user()
    namespace = target.namespace if multi_user else None
    client = target.client(multi_user)
    try:
        experiment_id = client.get_experiment(experiment_name=args.experiment, namespace=namespace).experiment_id
    except ValueError:
        raise InputError(f"--experiment: no KFP experiment {args.experiment!r} on {args.host}") from None
    if args.action == "list":
        lines = list_schedules(client, experiment_id, namespace)
        print("\n".join(lines) if lines else f"no schedules in experiment {args.experiment!r}")
        return 0
    recurring_id = change_schedule(client, experiment_id, namespace, args.name, args.action)
    print(f"{args.name}: {dict(pause='paused', resume='resumed', delete='deleted')[args.action]} (recurring run {recurring_id})")
    return 0


def _add_tracking_commands(commands) -> None:
    """sync-tracking, models, promote, compare and forget: what MLflow holds."""
    sync_cmd = _with_config(commands.add_parser("sync-tracking", help="send step metrics kept on disk while MLflow was unreachable"))
    sync_cmd.add_argument("--output-dir", help="the runs' --output-dir (default: the config's storage.work_dir holds the metrics)")
    sync_cmd.set_defaults(handler=_sync_tracking)

    models_cmd = _with_tracking_config(commands.add_parser("models", help="registered subject models: versions, aliases, figures"))
    models_cmd.add_argument("name", nargs="?", help="one registered model (default: all)")
    models_cmd.set_defaults(handler=_models)

    promote_cmd = _with_tracking_config(commands.add_parser("promote", help="point an alias (e.g. champion) at a reviewed version"))
    promote_cmd.add_argument("--model", required=True, help="the registered model, e.g. dreambooth-dog")
    chosen = promote_cmd.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--version", help="the version to promote")
    chosen.add_argument("--alias", help="the version this alias points at now, e.g. candidate")
    promote_cmd.add_argument("--to", required=True, help="the alias to move, e.g. champion")
    promote_cmd.add_argument("--note", default="", help="the reviewer's note, kept on the version")
    promote_cmd.set_defaults(handler=_promote)

    compare_cmd = _with_tracking_config(commands.add_parser("compare", help="compare runs: table, plots, image sheet"))
    compare_cmd.add_argument("--batch-run", help="the subjects of one batch run")
    compare_cmd.add_argument("--experiment", help="every evaluated subject run of an MLflow experiment")
    compare_cmd.add_argument("--runs", help="subject run ids, comma separated")
    compare_cmd.add_argument("--output-dir", default="outputs/compare", help="where the table, plots and sheet go (default: ./outputs/compare)")
    compare_cmd.add_argument("--force", action="store_true", help="compare runs whose evaluation protocols differ, marked")
    compare_cmd.set_defaults(handler=_compare)

    forget_cmd = _with_tracking(_with_config(commands.add_parser(
        "forget", help="remove a subject's photos and everything made from them; later batches skip it")))
    forget_cmd.add_argument("--subject", required=True, help="the subject's id (as in the subjects file)")
    forget_cmd.add_argument("--output-dir", help="also search here (a folder, or gs://bucket/prefix); by default every place "
                                                 "the subject's runs recorded writing to")
    forget_cmd.add_argument("--yes", action="store_true", help="remove without asking")
    forget_cmd.set_defaults(handler=_forget)


def _configs(args: argparse.Namespace, config: None) -> int:
    from dreambooth.config_files import shipped_configs

    described = shipped_configs()
    width = max(len(name) for name in described)
    for name, summary in described.items():
        print(f"{name:<{width}}  {summary}")
    print("\nuse one with --config NAME; `dreambooth config show --config NAME` prints every setting it resolves to")
    return 0


def _config_show(args: argparse.Namespace, config: RunConfig) -> int:
    import yaml

    print(f"# {config.name}: every setting after `extends:` and the defaults")
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, width=120), end="")
    return 0


def _add_tool_commands(commands) -> None:
    """configs, config show, watermark and components: reading what ships, and tools beside the pipeline."""
    commands.add_parser("configs", help="list the shipped configs, one line each").set_defaults(handler=_configs, needs_config=False)
    config_cmd = _with_config(commands.add_parser("config", help="show a config as it resolves (after extends: and defaults)"))
    config_cmd.add_argument("action", choices=["show"], help="show: print every setting the config resolves to, as YAML")
    config_cmd.set_defaults(handler=_config_show)

    watermark_cmd = commands.add_parser("watermark", help="read the invisible mark of a generated image")
    watermark_cmd.add_argument("action", choices=["check"], help="check: read the mark of IMAGE")
    watermark_cmd.add_argument("image", type=Path, help="a PNG or JPEG; exit 0 and its payload when marked, 1 when not")
    watermark_cmd.set_defaults(handler=_watermark_check, needs_config=False)

    components_cmd = commands.add_parser("components", help="write each stage's KFP component spec, for your own pipelines")
    components_cmd.add_argument("--output", type=Path, default=Path("components"), help="the folder (one sub-folder per stage)")
    components_cmd.set_defaults(handler=_components, needs_config=False)


class _Parser(argparse.ArgumentParser):
    """argparse, its usage errors in one line (`error: dreambooth run: ...; see dreambooth run --help`), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreambooth", description="DreamBooth personalisation as a Kubeflow pipeline")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.set_defaults(needs_config=True)
    _add_local_commands(commands)
    _add_cluster_commands(commands)
    _add_tracking_commands(commands)
    _add_tool_commands(commands)
    return parser


def _watermark_check(args: argparse.Namespace, config: None) -> int:
    from PIL import Image, UnidentifiedImageError

    from dreambooth.watermark import MIN_SIDE, can_carry_mark, detect

    image_path = args.image
    try:
        with Image.open(image_path) as image:
            if not can_carry_mark(image):  # "no watermark" would be a claim this image cannot support
                raise InputError(f"{image_path}: {image.width}x{image.height} px is too small to carry a mark (marks are "
                                 f"embedded from {MIN_SIDE} px on the shorter side); check the full-size image")
            payload = detect(image)
    except FileNotFoundError:
        raise InputError(f"{image_path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{image_path}: not an image PIL can read ({error})") from None
    print(f"{image_path}: watermarked, payload {payload}" if payload else f"{image_path}: no watermark")
    return 0 if payload else 1


def _check_locations(args: argparse.Namespace) -> None:
    """Folders and URIs given on the command line: local or gs:// only, refused before anything starts."""
    from dreambooth.storage import check_location

    for option in ("output_dir", "subject_dir", "subject_uri", "subjects_uri", "subjects"):
        if getattr(args, option, None):
            check_location(str(getattr(args, option)), f"--{option.replace('_', '-')}")


def _config_name(args: argparse.Namespace) -> str:
    """--config, or sd15 by default; a run on this machine never falls back to a real model without CUDA."""
    if args.config:
        return args.config
    if args.command in ("run", "experiment") and not getattr(args, "host", None):
        from dreambooth.models.loading import best_device

        if best_device().type != "cuda":
            raise InputError(f"--config: not given, and this machine has no CUDA GPU for the default ({DEFAULT_CONFIG}); "
                             "give --config tiny for a demo on this CPU, or a GPU config for real work on a GPU machine "
                             "(sd15, sdxl-lora, flux-lora ...: `dreambooth configs`)")
    return DEFAULT_CONFIG


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    configure_process(logging.WARNING, stop_on_sigterm=True)
    try:
        _check_locations(args)
        if not args.needs_config:
            return args.handler(args, None)
        config = _without_credentials(load_config(_config_name(args), _overrides(args)))
        from dreambooth.models.loading import allow_pickle_weights

        allow_pickle_weights(config.model.allow_pickle)
        return args.handler(args, config)
    except InputError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        unwinding()
        print(f"error: {args.command}: {str(stop) or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as error:  # a failure no check foresaw: still one line, the traceback on request
        if os.environ.get(DEBUG_ENV):
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        print(f"error: {args.command}: {type(error).__name__}: {first} (unexpected; {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        return 1
