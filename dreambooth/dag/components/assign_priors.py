from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def assign_priors(tracking_uri: str, batch_plan: dsl.Input[dsl.Artifact], prior_outcomes: list) -> list:
    """One item per subject to train, holding its group's class images."""
    from dreambooth.tasks.batch import assign_priors_task

    return assign_priors_task(tracking_uri, batch_plan.path, prior_outcomes)
