from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def samples(
    config_json: str,
    tracking_uri: str,
    subject_run_id: str,
    model: dsl.Input[dsl.Model],
    sample_images: dsl.Output[dsl.Artifact],
    sample_page: dsl.Output[dsl.HTML],
) -> str:
    """Sample the fine-tuned and base models from the same seeds; save a labelled grid (shown in the KFP UI); returns `ok` or `failed`."""
    from dreambooth.reports.pages import write_page
    from dreambooth.tasks.subject import FAILED_STATUS, OK, samples_task

    grid = samples_task(config_json, tracking_uri, subject_run_id, model.path, sample_images.path, sample_page.path)
    if grid is None:
        write_page(sample_page.path, None, "samples")
    return OK if grid is not None else FAILED_STATUS
