from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def plan_batch(
    config_json: str,
    tracking_uri: str,
    subjects_uri: str,
    subjects_json: str,
    force: bool,
    job_id: str,
    job_name: str,
    base_model: str,
    training_method: str,
    max_steps: int,
    learning_rate: float,
    prior_loss_weight: float,
    num_class_images: int,
    resolution: int,
    shard: str,
    batch_plan: dsl.Output[dsl.Artifact],
) -> int:
    """Read the subjects (when the run starts), skip those already trained, group their class priors; returns how many train.
    The run's own setting parameters (max_steps, learning_rate, ...) apply over config_json; `shard`: this run is one
    shard of a sharded batch (JSON, dreambooth.catalogue.shards), "" otherwise."""
    from dreambooth.config import RUN_SETTINGS
    from dreambooth.tasks.batch import plan_task

    given = locals()
    settings = {name: given[name] for name in RUN_SETTINGS}  # the run's own parameters, as config.RUN_SETTINGS names them
    return plan_task(config_json, tracking_uri, subjects_uri, subjects_json, force, job_id, job_name, batch_plan.path, settings, shard)
