"""Two training processes on CPU (gloo) behave as one run: one model, one MLflow run, the same weights
as one process accumulating the same effective batch."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
import torch
from safetensors.torch import load_file

from dreambooth.models.loading import LORA_WEIGHTS, resolve_model_source
from dreambooth.priors import prior_key
from dreambooth.tasks.subject import fine_tune_task, ingest_task, priors_task
from dreambooth.tracking import TAG_PARENT, TAG_STAGE, open_batch_run, open_subject_run


def _fine_tune(config, subject_dir: Path, tmp_path: Path, job: str, processes: int, tracking_uri: str) -> Path:
    # The same effective batch of 2: two processes of one example each, or one process accumulating two.
    per_process = {"batch_size": 2, "gradient_accumulation_steps": 1} if processes == 2 else {"batch_size": 1, "gradient_accumulation_steps": 2}
    config = config.model_copy(update={"training": config.training.model_copy(update={"num_processes": processes, **per_process})})
    root = tmp_path / job
    batch_run = open_batch_run(tracking_uri, config, job, job)
    subject_run = open_subject_run(tracking_uri, batch_run, config, job)
    arguments = (config.to_json(), tracking_uri, subject_run)
    assert ingest_task(*arguments, str(subject_dir), str(root / "subject"))
    priors = priors_task(config.to_json(), tracking_uri, batch_run, prior_key(config), str(root / "classes"), "")
    assert fine_tune_task(*arguments, str(root / "subject"), priors["class_images"], str(root / "model"), "")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_write_one_model_and_one_run_like_one_process(make_config, subject_dir, tmp_path, method):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(
        # Adam's epsilon large: updates follow the gradients instead of amplifying float noise in tiny ones.
        training={"max_steps": 6, "checkpoint_every": 3, "keep_checkpoints": True, "method": method,
                  "learning_rate": 1e-2, "adam_epsilon": 1.0, "lr_scheduler": "linear", "lr_warmup_steps": 2},
        priors={"num_class_images": 4, "sampler": {"num_inference_steps": 2}},
    )
    single = _fine_tune(config, subject_dir, tmp_path, "single", 1, tracking_uri)
    double = _fine_tune(config, subject_dir, tmp_path, "double", 2, tracking_uri)

    files = lambda root: sorted(str(p.relative_to(root / "model")) for p in (root / "model").rglob("*") if p.is_file())  # noqa: E731
    assert files(double) == files(single)
    weights = "unet/diffusion_pytorch_model.safetensors" if method == "full" else LORA_WEIGHTS
    single_unet, double_unet = load_file(single / "model" / weights), load_file(double / "model" / weights)
    assert double_unet.keys() == single_unet.keys()
    # Gradients synchronised across the processes: the weights match (a run that never all-reduced would not).
    base = load_file(Path(resolve_model_source("tiny://sd")) / "unet" / "diffusion_pytorch_model.safetensors") if method == "full" else None
    for key in single_unet:
        torch.testing.assert_close(double_unet[key], single_unet[key], atol=1e-6, rtol=1e-5)  # measured: 6e-8 full
    if base is not None:  # and training moved them (by up to 4e-3): equal because trained alike, not untouched
        assert max((single_unet[key] - base[key]).abs().max().item() for key in base) > 1e-3
    assert json.loads((double / "model" / "dreambooth.json").read_text())["steps"] == 6

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dreambooth")
    rates = {}
    for job in ("single", "double"):
        (parent,) = client.search_runs([experiment.experiment_id], f"tags.`kfp.job_id` = '{job}' and tags.`{TAG_STAGE}` = 'subject'")
        fine_tunes = client.search_runs(
            [experiment.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}' and tags.`{TAG_STAGE}` = 'fine-tune'"
        )
        assert len(fine_tunes) == 1
        assert fine_tunes[0].data.metrics["train_processes"] == (2 if job == "double" else 1)
        steps = [m.step for m in client.get_metric_history(fine_tunes[0].info.run_id, "loss")]
        assert steps == list(range(1, 7))  # logged once per step, by the main process only
        rates[job] = [m.value for m in sorted(client.get_metric_history(fine_tunes[0].info.run_id, "lr"), key=lambda m: m.step)]
    # Warmup and decay last as many steps with two processes as with one (accelerate steps the schedule per process).
    assert rates["double"] == pytest.approx(rates["single"]) and rates["single"][0] < rates["single"][1] > rates["single"][-1]
