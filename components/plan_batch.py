from kfp import dsl

from components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def plan_batch(
    config_json: str,
    tracking_uri: str,
    subjects_uri: str,
    subjects_json: str,
    force: bool,
    job_id: str,
    job_name: str,
    batch_plan: dsl.Output[dsl.Artifact],
) -> int:
    """Read the subjects (when the run starts), skip those already trained, group their class priors; returns how many train."""
    from dreambooth.tasks.batch import plan_task

    return plan_task(config_json, tracking_uri, subjects_uri, subjects_json, force, job_id, job_name, batch_plan.path)
