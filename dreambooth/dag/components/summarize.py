from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def summarize(
    tracking_uri: str,
    job_name: str,
    batch_plan: dsl.Input[dsl.Artifact],
    subject_statuses: list,
    summary: dsl.Output[dsl.Markdown],
    summary_page: dsl.Output[dsl.HTML],
) -> int:
    """The batch summary (a row per subject, sample grids inline) in MLflow and KFP; returns how many subjects failed."""
    from dreambooth.tasks.batch import summary_task

    return summary_task(tracking_uri, batch_plan.path, job_name, subject_statuses, summary.path, summary_page.path)
