from kfp import dsl

from components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str,
    tracking_uri: str,
    subject_run_id: str,
    model: dsl.Input[dsl.Model],
    subject_images: dsl.Input[dsl.Dataset],
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
) -> str:
    """DreamBench evaluation and the quality gate; returns the registered model, `rejected` or `failed`."""
    from dreambooth.tasks.stages import FAILED_STATUS, evaluate_task

    outcome = evaluate_task(config_json, tracking_uri, subject_run_id, model.path, subject_images.path, evaluation.path)
    if outcome is None:
        with open(report.path, "w") as markdown:
            markdown.write("The evaluation failed; the reason is on the subject's MLflow run.\n")
        return FAILED_STATUS
    for name, value in outcome.metrics.items():
        metrics.log_metric(name, value)
    with open(report.path, "w") as markdown:
        markdown.write(outcome.report_markdown)
    return outcome.registered or "rejected"
