from kfp import dsl

from components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str,
    tracking_uri: str,
    job_id: str,
    job_name: str,
    model: dsl.Input[dsl.Model],
    subject_images: dsl.Input[dsl.Dataset],
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
) -> str:
    """DreamBench evaluation and the quality gate; returns the registered model or the rejection."""
    from dreambooth.tasks import evaluate_task

    outcome = evaluate_task(
        config_json, tracking_uri, job_id, job_name, model.path, subject_images.path, evaluation.path
    )
    for name, value in outcome.metrics.items():
        metrics.log_metric(name, value)
    with open(report.path, "w") as markdown:
        markdown.write(outcome.report_markdown)
    return outcome.registered or "rejected"
