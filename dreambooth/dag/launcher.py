"""The launcher pipeline of a sharded batch (dreambooth.catalogue.shards): what `submit`/`schedule` send when
batch.max_subjects_per_run is set. Its one task plans the whole subjects file at every tick and
creates a run of the DAG (dreambooth.dag.pipeline) per shard with work; its exit handler closes the
batch run only when no shard was started (otherwise the last shard to end does).
"""

# No `from __future__ import annotations` here: KFP reads the pipeline signature's real types.
from kfp import dsl, kubernetes

from dreambooth.dag.components.finish_tracking import finish_tracking
from dreambooth.dag.components.image import COMPONENT_IMAGE
from dreambooth.config import RunConfig
from dreambooth.dag.pipeline import JOB_ID, JOB_NAME, run_settings_of, stage_settings
from dreambooth.stages import LAUNCH_SHARDS

LAUNCHER_NAME = "dreambooth-shards"
KFP_API_ACCESS_LABEL = "access-ml-pipeline"  # the label Kubeflow's PodDefault for the pipelines API selects


# The launcher's own component: it creates runs of the DAG (dreambooth.dag.kfp_runs), so it lives beside the
# launcher, above the DAG's components, not among them.
@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def launch_shards(
    config_json: str,
    tracking_uri: str,
    subjects_uri: str,
    force: bool,
    kfp_experiment: str,
    job_id: str,
    job_name: str,
    base_model: str,
    training_method: str,
    max_steps: int,
    learning_rate: float,
    prior_loss_weight: float,
    num_class_images: int,
    resolution: int,
) -> int:
    """Plan the whole subjects file, then create a DreamBooth run per shard of subjects with work (through the
    cluster's KFP API, cluster.kfp_host); returns how many shards were started."""
    from dreambooth.config import RUN_SETTINGS
    from dreambooth.dag.kfp_runs import shard_launcher
    from dreambooth.tasks.launch import launch_shards_task

    given = locals()
    settings = {name: given[name] for name in RUN_SETTINGS}  # the run's own parameters, as config.RUN_SETTINGS names them
    with shard_launcher(config_json, tracking_uri, kfp_experiment, job_name, force, settings) as launch:
        return len(launch_shards_task(config_json, tracking_uri, subjects_uri, force, job_id, job_name, launch, settings))


def build_shard_launcher(config: RunConfig, on_cluster: bool = False):
    """The pipeline `submit`/`schedule` send for a sharded batch (batch.max_subjects_per_run): one task plans
    the whole subjects file at every tick and creates a run of the DAG above per shard with work."""
    settings = stage_settings(config, on_cluster)

    def stage(task):
        settings(task)
        if on_cluster and task.component_spec.name == LAUNCH_SHARDS.name:  # its KFP API token (manifests/base/kfp-api-access.yaml)
            kubernetes.add_pod_label(task, KFP_API_ACCESS_LABEL, "true")
        return task

    @dsl.pipeline(
        name=LAUNCHER_NAME, description="Plan a subjects file and start a DreamBooth batch run per shard of subjects with work",
        pipeline_root=config.cluster.pipeline_root if on_cluster and config.cluster else None,
    )
    def dreambooth_shards(
        config_json: str,
        tracking_uri: str,
        subjects_uri: str,
        kfp_experiment: str,
        force: bool = False,
        base_model: str = "",
        training_method: str = "full",
        max_steps: int = 1000,
        learning_rate: float = 5e-6,
        prior_loss_weight: float = 1.0,
        num_class_images: int = 200,
        resolution: int = 0,
    ):
        run_settings = run_settings_of(locals())
        close_runs = stage(finish_tracking(config_json=config_json, tracking_uri=tracking_uri, job_id=JOB_ID))
        with dsl.ExitHandler(close_runs, name="dreambooth-shards"):
            stage(launch_shards(
                config_json=config_json, tracking_uri=tracking_uri, subjects_uri=subjects_uri, force=force,
                kfp_experiment=kfp_experiment, job_id=JOB_ID, job_name=JOB_NAME, **run_settings,
            ))

    return dreambooth_shards
