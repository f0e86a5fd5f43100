from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def batch_failures(tracking_uri: str, batch_plan: dsl.Input[dsl.Artifact]):
    """Fail the run when a subject failed, naming each with its reason (the other subjects finished)."""
    from dreambooth.tasks.batch import batch_failures_task

    batch_failures_task(tracking_uri, batch_plan.path)
