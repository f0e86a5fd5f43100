from kfp import dsl

from components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def finetune(
    config_json: str,
    tracking_uri: str,
    job_id: str,
    job_name: str,
    subject_images: dsl.Input[dsl.Dataset],
    class_images: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
):
    """DreamBooth fine-tune with prior preservation; writes a diffusers pipeline folder."""
    from dreambooth.tasks import finetune_task

    finetune_task(config_json, tracking_uri, job_id, job_name, subject_images.path, class_images.path, model.path)
