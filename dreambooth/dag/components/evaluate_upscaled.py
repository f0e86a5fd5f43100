from kfp import dsl

from dreambooth.dag.components.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate_upscaled(
    config_json: str,
    tracking_uri: str,
    subject_run_id: str,
    model: dsl.Input[dsl.Model],
    upscaler: dsl.Input[dsl.Model],
    subject_images: dsl.Input[dsl.Dataset],
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
    grids: dsl.Output[dsl.HTML],
) -> str:
    """DreamBench scores of the cascade at 4x resolution, with the generic and the personalised upscaler."""
    from dreambooth.tasks.subject import FAILED_STATUS, OK, evaluate_upscaled_task, write_kfp_evaluation

    outcome = evaluate_upscaled_task(
        config_json, tracking_uri, subject_run_id, model.path, upscaler.path, subject_images.path, evaluation.path
    )
    return OK if write_kfp_evaluation(outcome, metrics.log_metric, report.path, grids.path) else FAILED_STATUS
