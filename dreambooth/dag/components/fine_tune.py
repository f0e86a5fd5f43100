from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def fine_tune(
    config_json: str,
    tracking_uri: str,
    subject_run_id: str,
    subject_images: dsl.Input[dsl.Dataset],
    class_images: str,
    model: dsl.Output[dsl.Model],
) -> str:
    """DreamBooth fine-tune with prior preservation; writes a diffusers pipeline folder; returns `ok` or `failed`."""
    from dreambooth.tasks.subject import FAILED_STATUS, OK, fine_tune_task

    saved = fine_tune_task(config_json, tracking_uri, subject_run_id, subject_images.path, class_images, model.path, model.uri)
    return OK if saved is not None else FAILED_STATUS
