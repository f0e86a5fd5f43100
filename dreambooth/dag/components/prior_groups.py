from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def prior_groups(batch_plan: dsl.Input[dsl.Artifact]) -> list:
    """One item per group of subjects whose class images are drawn identically."""
    from dreambooth.tasks.batch import prior_groups_task

    return prior_groups_task(batch_plan.path)
