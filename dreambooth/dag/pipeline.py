"""DreamBooth as a Kubeflow pipeline: a batch of subjects, each personalised with prior preservation.

    plan-batch                       read the subjects (when the run starts), skip the up-to-date ones
      -> class priors                one task per group of subjects sharing a class (ParallelFor)
      -> assign-priors               each subject gets its group's class images
      -> per subject (ParallelFor):  ingest -> fine-tune -> samples
                                                         \\-> evaluate          (quality gate, registry)
                                                         \\-> super-resolution -> evaluate-upscaled
      -> summarize                   a row per subject in MLflow and KFP (dsl.Collected)
    an exit handler closes the MLflow runs

This module only wires the DAG; the command line (`dreambooth ...`, or `python pipeline.py ...`
in a checkout) lives in dreambooth/cli.py.
"""

# No `from __future__ import annotations` here: KFP reads the pipeline signature's real types.
from kfp import dsl

from dreambooth.dag.components.assign_priors import assign_priors
from dreambooth.dag.components.batch_failures import batch_failures
from dreambooth.dag.components.class_priors import class_priors
from dreambooth.dag.components.evaluate import evaluate
from dreambooth.dag.components.evaluate_upscaled import evaluate_upscaled
from dreambooth.dag.components.fine_tune import fine_tune
from dreambooth.dag.components.finish_tracking import finish_tracking
from dreambooth.dag.components.ingest import ingest
from dreambooth.dag.components.plan_batch import plan_batch
from dreambooth.dag.platform import apply_cluster_settings, apply_retry_policy
from dreambooth.dag.components.prior_groups import prior_groups
from dreambooth.dag.components.samples import samples
from dreambooth.dag.components.summarize import summarize
from dreambooth.dag.components.super_resolution import super_resolution
from dreambooth.config import RUN_SETTINGS, RunConfig
from dreambooth.stages import BY_NAME
from dreambooth.tracking.store import OUTAGE_TOLERANCE_ENV

PIPELINE_NAME = "dreambooth"
JOB_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER
JOB_NAME = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
OK = "ok"


def stage_settings(config: RunConfig, on_cluster: bool):
    """What every task gets, as a stage of the table (dreambooth.stages): never cached (each reads or writes
    MLflow), waiting out a tracking outage (tracking.outage_tolerance); on a cluster, its stage's
    Kubernetes settings; locally, its retries."""

    def stage(task):
        name = BY_NAME[task.component_spec.name].name
        task.set_caching_options(False)
        task.set_env_variable(OUTAGE_TOLERANCE_ENV, str(config.tracking.outage_tolerance))
        if on_cluster:
            apply_cluster_settings(task, name, config.cluster)
        elif config.cluster:  # a local run of a cluster config retries as the cluster would
            apply_retry_policy(task, name, config.cluster)
        return task

    return stage


def run_settings_of(pipeline_parameters: dict) -> dict:
    """The run's own setting parameters (config.RUN_SETTINGS), from a pipeline function's parameters, for the
    task that applies them. The pipelines declare them in their signatures, which KFP reads for the UI's form
    (tests/dag/test_pipeline_parameters.py holds each signature to the table)."""
    return {name: pipeline_parameters[name] for name in RUN_SETTINGS}


def build_pipeline(config: RunConfig, on_cluster: bool = False):
    """The DAG; on_cluster adds every task's Kubernetes settings (image, GPUs, secrets...) from config.cluster."""
    priors_at_once = subjects_at_once = config.batch.parallelism
    if on_cluster and config.cluster.gpu_quota:
        priors_at_once, subjects_at_once = config.cluster.loop_parallelism(config.superres.enabled)

    stage = stage_settings(config, on_cluster)
    pipeline_root = config.cluster.pipeline_root if on_cluster and config.cluster else None

    @dsl.pipeline(
        name=PIPELINE_NAME, description="DreamBooth personalisation of a batch of subjects, with prior preservation",
        pipeline_root=pipeline_root,
    )
    def dreambooth_batch(
        config_json: str,
        tracking_uri: str,
        subjects_uri: str = "",
        subjects_json: str = "",
        force: bool = False,
        superres_enabled: bool = True,
        # The settings people compare, as parameters of their own (defaults: the compiled config's).
        base_model: str = "",
        training_method: str = "full",
        max_steps: int = 1000,
        learning_rate: float = 5e-6,
        prior_loss_weight: float = 1.0,
        num_class_images: int = 200,
        resolution: int = 0,
        shard: str = "",  # set by the launch of a sharded batch (dreambooth.catalogue.shards)
    ):
        run_settings = run_settings_of(locals())
        close_runs = stage(finish_tracking(config_json=config_json, tracking_uri=tracking_uri, job_id=JOB_ID))
        with dsl.ExitHandler(close_runs, name="dreambooth-batch"):
            plan = stage(plan_batch(
                config_json=config_json, tracking_uri=tracking_uri, subjects_uri=subjects_uri, subjects_json=subjects_json,
                force=force, job_id=JOB_ID, job_name=JOB_NAME, shard=shard, **run_settings,
            ))
            batch_plan = plan.outputs["batch_plan"]
            # kfp.local cannot collect from an empty loop, and a cluster should not start GPU pods
            # for nothing: when every subject is up to date, only the summary runs.
            with dsl.If(plan.outputs["Output"] > 0, name="subjects-to-train"):
                groups = stage(prior_groups(batch_plan=batch_plan))
                with dsl.ParallelFor(groups.output, name="class-prior-groups", parallelism=priors_at_once) as group:
                    priors = stage(class_priors(
                        config_json=group.config_json, tracking_uri=tracking_uri,
                        batch_run_id=group.batch_run_id, prior_key=group.prior_key,
                    ))
                ready = stage(assign_priors(
                    tracking_uri=tracking_uri, batch_plan=batch_plan, prior_outcomes=dsl.Collected(priors.outputs["Output"])
                ))
                with dsl.ParallelFor(ready.output, name="subjects", parallelism=subjects_at_once) as subject:
                    ingested = _subject_stages(subject, tracking_uri, superres_enabled, stage)
                summary = stage(summarize(
                    tracking_uri=tracking_uri, job_name=JOB_NAME, batch_plan=batch_plan,
                    subject_statuses=dsl.Collected(ingested.outputs["Output"]),
                ))
                with dsl.If(summary.outputs["Output"] > 0, name="any-subject-failed"):
                    stage(batch_failures(tracking_uri=tracking_uri, batch_plan=batch_plan))
            with dsl.Else(name="all-up-to-date"):
                stage(summarize(tracking_uri=tracking_uri, job_name=JOB_NAME, batch_plan=batch_plan, subject_statuses=[]))

    return dreambooth_batch


def _subject_stages(subject, tracking_uri, superres_enabled, stage):
    """One subject's chain; each stage runs only when the one before it succeeded for this subject.

    Stages report `ok` or `failed` as their return value (`Output`): kfp.local resolves conditions
    on a task's `Output` only, and a loop item's fields not at all (hence `superres_enabled`, a
    pipeline parameter, rather than a per-subject field).
    """
    run = dict(config_json=subject.config_json, tracking_uri=tracking_uri, subject_run_id=subject.subject_run_id)
    ingested = stage(ingest(**run, photos=subject.photos))
    with dsl.If(ingested.outputs["Output"] == OK, name="ingested"):
        images = ingested.outputs["subject_images"]
        tuned = stage(fine_tune(**run, subject_images=images, class_images=subject.class_images))
        with dsl.If(tuned.outputs["Output"] == OK, name="fine-tuned"):
            model = tuned.outputs["model"]
            stage(samples(**run, model=model))
            stage(evaluate(**run, model=model, subject_images=images, class_images=subject.class_images))
            with dsl.If(superres_enabled == True, name="superres-enabled"):  # noqa: E712 (a KFP condition)
                upscaled = stage(super_resolution(**run, subject_images=images, class_images=subject.class_images, model=model))
                with dsl.If(upscaled.outputs["Output"] == OK, name="upscaler-trained"):
                    stage(evaluate_upscaled(**run, model=model, upscaler=upscaled.outputs["upscaler"], subject_images=images))
    return ingested

