from kfp import dsl

from dreambooth.components.image import COMPONENT_IMAGE


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
    from dreambooth.kfp_runs import shard_launcher
    from dreambooth.tasks.shards import launch_shards_task

    settings = dict(base_model=base_model, training_method=training_method, max_steps=max_steps, learning_rate=learning_rate,
                    prior_loss_weight=prior_loss_weight, num_class_images=num_class_images, resolution=resolution)
    with shard_launcher(config_json, tracking_uri, kfp_experiment, job_name, force, settings) as launch:
        return len(launch_shards_task(config_json, tracking_uri, subjects_uri, force, job_id, job_name, launch, settings))
