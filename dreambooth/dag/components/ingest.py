from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def ingest(
    config_json: str,
    tracking_uri: str,
    subject_run_id: str,
    photos: str,
    subject_images: dsl.Output[dsl.Dataset],
) -> str:
    """Validate and normalise the subject photos, choose the identifier; returns `ok` or `failed`."""
    from dreambooth.tasks.subject import FAILED_STATUS, OK, ingest_task

    identifier = ingest_task(config_json, tracking_uri, subject_run_id, photos, subject_images.path)
    return OK if identifier is not None else FAILED_STATUS
