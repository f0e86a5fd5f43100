from kfp import dsl

from components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def class_priors(
    config_json: str,
    tracking_uri: str,
    job_id: str,
    job_name: str,
    class_images: dsl.Output[dsl.Dataset],
) -> int:
    """Generate the class images for prior preservation with the frozen base model."""
    from dreambooth.tasks import priors_task

    return priors_task(config_json, tracking_uri, job_id, job_name, class_images.path)
