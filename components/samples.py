from kfp import dsl

from components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def samples(
    config_json: str,
    tracking_uri: str,
    job_id: str,
    job_name: str,
    model: dsl.Input[dsl.Model],
    sample_images: dsl.Output[dsl.Artifact],
) -> str:
    """Sample the fine-tuned and base models from the same seeds; save a labelled grid."""
    from dreambooth.tasks import samples_task

    return samples_task(config_json, tracking_uri, job_id, job_name, model.path, sample_images.path)
