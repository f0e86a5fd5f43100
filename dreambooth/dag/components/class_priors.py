from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def class_priors(
    config_json: str,
    tracking_uri: str,
    batch_run_id: str,
    prior_key: str,
    class_images: dsl.Output[dsl.Dataset],
) -> dict:
    """Generate one group's class images with the frozen base model (reused from the cache when present)."""
    from dreambooth.tasks.subject import priors_task

    return priors_task(config_json, tracking_uri, batch_run_id, prior_key, class_images.path, class_images.uri)
