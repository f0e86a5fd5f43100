from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str,
    tracking_uri: str,
    subject_run_id: str,
    model: dsl.Input[dsl.Model],
    subject_images: dsl.Input[dsl.Dataset],
    class_images: str,
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
    grids: dsl.Output[dsl.HTML],
) -> str:
    """DreamBench evaluation, the learning check (on the class images too, when the subject has them)
    and the quality gate; returns the registered model, `rejected` or `failed`."""
    from dreambooth.tasks.subject import FAILED_STATUS, evaluate_task, write_kfp_evaluation

    outcome = evaluate_task(config_json, tracking_uri, subject_run_id, model.path, subject_images.path, evaluation.path, class_images)
    if not write_kfp_evaluation(outcome, metrics.log_metric, report.path, grids.path):
        return FAILED_STATUS
    return outcome.registered or "rejected"
