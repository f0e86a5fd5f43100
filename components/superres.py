from kfp import dsl

from components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def superres(
    config_json: str,
    tracking_uri: str,
    job_id: str,
    job_name: str,
    subject_images: dsl.Input[dsl.Dataset],
    class_images: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    upscaler: dsl.Output[dsl.Model],
):
    """Personalised super-resolution: the x4 upscaler fine-tuned on the subject with low noise augmentation."""
    from dreambooth.tasks import superres_task

    superres_task(
        config_json, tracking_uri, job_id, job_name, subject_images.path, class_images.path, model.path, upscaler.path
    )
