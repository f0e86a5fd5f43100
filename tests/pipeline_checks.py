"""What a finished pipeline run leaves behind, checked the same way by every whole-run test: the
report `run` prints, a subject's MLflow runs, and the outputs the KFP UI shows."""

from __future__ import annotations

import base64
import io
import json
import re
import tempfile
from pathlib import Path

from PIL import Image

from dreambooth.tracking import TAG_CLASS_NOUN, TAG_MODEL_URI, TAG_PARENT, TAG_STAGE, TAG_SUBJECT, TAG_WATERMARK
from dreambooth.watermark import detect

SUBJECT_STAGES = ["ingest", "fine-tune", "samples", "evaluate"]
SUPERRES_STAGES = ["super-resolution", "evaluate-upscaled"]


def subject_blocks(stdout: str) -> dict[str, dict]:
    """{subject: its indented `label: value` lines} from the report `run` prints after a batch."""
    blocks: dict[str, dict] = {}
    current = None
    for line in stdout.split("\nbatch:", 1)[-1].splitlines():
        found = re.match(r"^(\S+) \(\w+\): ", line)
        if found:
            current = blocks.setdefault(found[1], {})
        elif current is not None and line.startswith("  ") and ":" in line:
            key, value = line.split(":", 1)
            current[key.strip()] = value.strip()
    return blocks


def report_lines(stdout: str) -> dict[str, str]:
    """The `label: value` lines of the report's head (job, task logs, mlflow run, batch)."""
    head = stdout.split("\njob:", 1)[-1]
    return {key.strip(): value.strip() for key, value in
            (line.split(":", 1) for line in f"job:{head}".split("\n\n")[0].splitlines() if ":" in line)}


def check_tracked_subject(client, subject_run_id: str, stages=tuple(SUBJECT_STAGES), steps=8, method="full"):
    """A subject's run under a finished batch run, beside its class's priors run; one run per stage under
    it, each with the settings, the photos and the figures users compare runs by. Returns the subject's run."""
    subject = client.get_run(subject_run_id)
    experiment = subject.info.experiment_id
    name, class_noun = subject.data.tags[TAG_SUBJECT], subject.data.params["subject.class_noun"]
    assert subject.info.status == "FINISHED"
    batch = client.get_run(subject.data.tags[TAG_PARENT])
    assert batch.data.tags[TAG_STAGE] == "batch" and batch.info.status == "FINISHED"
    below_batch = client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{batch.info.run_id}'")
    assert {run.data.tags[TAG_STAGE] for run in below_batch} == {"class-priors", "subject"}
    (priors,) = [run for run in below_batch if run.data.tags[TAG_STAGE] == "class-priors" and run.data.tags[TAG_CLASS_NOUN] == class_noun]
    assert "class-priors-preview.png" in {a.path for a in client.list_artifacts(priors.info.run_id)}

    children = client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{subject.info.run_id}'")
    assert sorted(run.data.tags[TAG_STAGE] for run in children) == sorted(stages)
    assert all(run.info.status == "FINISHED" for run in children)
    fine_tune = next(run for run in children if run.data.tags[TAG_STAGE] == "fine-tune")
    for curve in ("loss", "instance_loss", "prior_loss", "lr"):
        assert [m.step for m in client.get_metric_history(fine_tune.info.run_id, curve)] == list(range(1, steps + 1))
    assert "train_steps_per_second" in subject.data.metrics
    assert subject.data.params["model.base"] == "tiny://sd"
    assert {"manifest.json", "samples-grid.png"} <= {a.path for a in client.list_artifacts(subject.info.run_id)}
    assert subject.data.tags[TAG_MODEL_URI].startswith("models:/")  # the pipeline folder as an MLflow model

    evaluation = next(run for run in children if run.data.tags[TAG_STAGE] == "evaluate")
    for metric in ("eval/dino", "eval/clip_i", "eval/clip_t", "eval/div", "eval/pres", "eval/pres_base", "eval/real_images_dino"):
        assert metric in evaluation.data.metrics and metric in subject.data.metrics
    evaluation_files = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"eval_prompts.json", "evaluation_config.json", "report.md", "eval_grids"} <= evaluation_files
    grids = {a.path for a in client.list_artifacts(evaluation.info.run_id, "eval_grids")}
    assert {"eval_grids/grid-recontextualization.png", "eval_grids/grid-accessorization.png"} <= grids
    # What the subject's model drew carries the mark its run names (the model's training fingerprint).
    with tempfile.TemporaryDirectory() as scratch:
        for run_id, drawn in ((subject.info.run_id, "samples-grid.png"), (evaluation.info.run_id, "eval_grids/grid-accessorization.png")):
            with Image.open(client.download_artifacts(run_id, drawn, scratch)) as image:
                assert detect(image) == subject.data.tags[TAG_WATERMARK], drawn

    # Every stage run: the settings people compare as params, the photos as its input, system metrics.
    photos = subject.inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.source_type, len(d.dataset.digest)) for d in photos] == [(f"{name}-photos", "local", 32)]
    for run in children:
        assert run.data.params["training.method"] == method and run.data.params["training.max_steps"] == str(steps)
        assert {"model.base", "training.learning_rate", "training.prior_loss_weight", "priors.num_class_images", "model.resolution"} <= set(run.data.params)
        assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [photos[0].dataset.digest], run.data.tags[TAG_STAGE]
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics), run.data.tags[TAG_STAGE]
        assert run.data.metrics["cost/accelerator_seconds"] > 0 and run.data.tags["dreambooth.node_type"] == "cpu"
    # What the stages took, summed on the subject's run when the summary closed it
    assert abs(subject.data.metrics["cost/accelerator_seconds"] - sum(run.data.metrics["cost/accelerator_seconds"] for run in children)) < 1e-6
    return subject


def check_kfp_outputs(iteration_dir: Path) -> None:
    """The evaluation shows in KFP too: a Metrics output (in the executor metadata) and a Markdown report."""
    executor_output = json.loads((iteration_dir / "evaluate" / "executor_output.json").read_text())
    metrics = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"dino", "clip_i", "clip_t", "div", "pres"} <= set(metrics)
    assert (iteration_dir / "evaluate" / "report").read_text().startswith("# DreamBench evaluation")


def check_kfp_pages(iteration_dir: Path, superres: bool) -> None:
    """The KFP UI renders HTML outputs inline: the sample grid, the evaluation grids and the upscaler comparison, images inside."""
    expected = {"samples/sample_page": 1, "evaluate/grids": 3}
    if superres:
        expected.update({"super-resolution/comparison": 1, "evaluate-upscaled/grids": 6})
    for output, count in expected.items():
        page = (iteration_dir / output).read_text()
        images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
        assert len(images) >= count, (output, len(images))
        for data in images:
            with Image.open(io.BytesIO(base64.b64decode(data))) as image:
                assert image.format == "JPEG" and min(image.size) >= 64
    assert "DINO" in (iteration_dir / "evaluate" / "grids").read_text()  # the headline figures above the grids
