from kfp import dsl

from components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def ingest(
    config_json: str,
    tracking_uri: str,
    subject_uri: str,
    job_id: str,
    job_name: str,
    subject_images: dsl.Output[dsl.Dataset],
) -> str:
    """Validate and normalise the subject photos; choose the identifier (returned)."""
    from dreambooth.tasks import ingest_task

    return ingest_task(config_json, tracking_uri, job_id, job_name, subject_uri, subject_images.path)
