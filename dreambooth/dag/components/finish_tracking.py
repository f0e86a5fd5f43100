from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def finish_tracking(config_json: str, tracking_uri: str, job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the batch's MLflow run with the pipeline's final state (and any run a crash left open)."""
    from dreambooth.tasks.batch import exit_handler_task

    exit_handler_task(config_json, tracking_uri, job_id, status.state)
