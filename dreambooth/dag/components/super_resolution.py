from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def super_resolution(
    config_json: str,
    tracking_uri: str,
    subject_run_id: str,
    subject_images: dsl.Input[dsl.Dataset],
    class_images: str,
    model: dsl.Input[dsl.Model],
    upscaler: dsl.Output[dsl.Model],
    comparison: dsl.Output[dsl.HTML],
) -> str:
    """Personalised super-resolution: the x4 upscaler fine-tuned on the subject with low noise augmentation;
    a low-res / generic / personalised comparison shown in the KFP UI."""
    from dreambooth.reports.pages import write_page
    from dreambooth.tasks.subject import FAILED_STATUS, OK, super_resolution_task

    saved = super_resolution_task(
        config_json, tracking_uri, subject_run_id, subject_images.path, class_images, model.path, upscaler.path, comparison.path
    )
    if saved is None:
        write_page(comparison.path, None, "super-resolution")
    return OK if saved is not None else FAILED_STATUS
