"""The evaluation stage end to end on tiny models: protocol, outputs, prior preservation and the gate."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_SUBJECT
from dreambooth.config import GateSettings, load_config
from dreambooth.evaluation.evaluate import PRES_SEED_OFFSET, RESULTS_FILE, EvaluationInputs, evaluate_model
from dreambooth.models.loading import METADATA_FILE
from dreambooth.generation import generate, load_sampling_pipeline
from dreambooth.watermark import detect, embed, payload_for


def _personalised(base: Path, model: Path) -> Path:
    """A folder in the fine-tuned layout (the tiny base weights stand in for trained ones)."""
    shutil.copytree(base, model)
    (model / METADATA_FILE).write_text(json.dumps({"identifier": "fqs", "class_noun": "dog", "base_model": str(base)}))
    return model


@pytest.fixture
def personalised_model(tiny_model_dir, tmp_path):
    return _personalised(tiny_model_dir, tmp_path / "model")


@pytest.fixture(scope="session")  # session: the slow test runs first, apart from the module's others
def evaluated(tiny_model_dir, tmp_path_factory):
    """One evaluation of a live subject with the tiny config's settings, read by several tests:
    (the model, the config, the result, the folder it wrote)."""
    root = tmp_path_factory.mktemp("evaluated")
    model = _personalised(tiny_model_dir, root / "model")
    config = load_config("tiny", {"subject": {"class_noun": "dog", "name": "dog"}, "storage": {"work_dir": str(root / "work")}})
    return model, config, evaluate_model(str(model), SAMPLE_SUBJECT, EvaluationInputs.of(config), root / "eval"), root / "eval"


@pytest.mark.xdist_group("evaluated")  # one worker evaluates once for these
def test_a_live_subject_is_scored_per_category_and_written_out(evaluated):
    model, _, result, written_to = evaluated
    assert result.live_subject and result.identifier == "fqs"
    assert sorted(result.by_category) == ["accessorization", "property", "recontextualization"]
    assert len(result.prompts) == 6 and all("fqs dog" in score.prompt for score in result.prompts)
    assert set(result.overall) == {"dino", "clip_i", "clip_t", "div", "pres", "pres_base"}
    assert all(np.isfinite(value) for value in result.overall.values())
    assert set(result.real_images) == {"dino", "clip_i"}
    written = json.loads((written_to / RESULTS_FILE).read_text())
    assert written["settings"]["dino_model"] == "tiny://dino" and written["settings"]["images_per_prompt"] == 2
    for category in result.by_category:
        with Image.open(written_to / f"grid-{category}.png") as grid:
            assert detect(grid) == payload_for(model)  # every image written carries the model's mark
    with Image.open(written_to / result.prompts[0].image_files[0]) as image:
        assert detect(image) == payload_for(model)


@pytest.mark.xdist_group("evaluated")  # one worker evaluates once for these
def test_prior_preservation_images_come_from_the_class_prompt(evaluated):
    model, config, result, written_to = evaluated
    assert result.class_prompt == "a dog"

    sampler = config.evaluation.sampler
    pipeline = load_sampling_pipeline(str(model), sampler)
    expected = generate(pipeline, [("a dog", sampler.seed + PRES_SEED_OFFSET + i) for i in range(2)], sampler)
    for i, image in enumerate(expected):
        with Image.open(written_to / "images" / "prior-preservation" / f"fine-tuned-{i}.png") as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(embed(image, payload_for(model))))


@pytest.mark.xdist_group("evaluated")  # one worker evaluates once for these
def test_the_gate_names_every_failed_threshold(evaluated, tmp_path):
    model, config, passed, _ = evaluated
    assert passed.gate.passed  # the tiny config's gate
    strict = config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"gate": GateSettings(min_dino=2.0, min_clip_t=2.0, max_pres=-2.0)})})
    result = evaluate_model(str(model), SAMPLE_SUBJECT, EvaluationInputs.of(strict), tmp_path / "eval")
    assert not result.gate.passed
    assert [reason.split()[0] for reason in result.gate.reasons] == ["DINO", "CLIP-T", "PRES"]


def test_an_object_subject_gets_the_object_prompts(personalised_model, subject_dir, make_config, tmp_path):
    result = evaluate_model(str(personalised_model), subject_dir, EvaluationInputs.of(make_config()), tmp_path / "eval", class_noun="teapot")
    assert not result.live_subject
    assert sorted(result.by_category) == ["property", "recontextualization"]


@pytest.mark.slow
@pytest.mark.xdist_group("evaluated")
def test_generation_split_across_processes_scores_the_same(evaluated, make_config, tmp_path):
    model, _, alone, _ = evaluated
    split = evaluate_model(str(model), SAMPLE_SUBJECT, EvaluationInputs.of(make_config(evaluation={"num_processes": 2})), tmp_path / "split")
    for name, value in alone.overall.items():
        assert split.overall[name] == pytest.approx(value, abs=0.02)  # the same seeds, drawn in two processes


def test_missing_encoder_weights_fail_before_any_image_is_generated(personalised_model, subject_dir, make_config, tmp_path, monkeypatch):
    from dreambooth.errors import InputError
    from dreambooth.evaluation import evaluate

    drawn = []
    monkeypatch.setattr(evaluate, "_draw", lambda *args: drawn.append(args) or [])
    config = make_config(evaluation={"lpips_model": str(tmp_path / "no-lpips-here")})
    with pytest.raises(InputError, match="evaluation.lpips_model: .*no-lpips-here"):
        evaluate_model(str(personalised_model), subject_dir, EvaluationInputs.of(config), tmp_path / "eval")
    assert drawn == []  # the GPU time is not spent first


def test_evaluation_switched_off_skips_both_evaluation_stages(make_config, subject_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from dreambooth.tasks.subject import evaluate_task, evaluate_upscaled_task
    from dreambooth.tracking import TAG_PARENT, open_batch_run, open_subject_run

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(evaluation={"enabled": False})
    subject_run = open_subject_run(tracking, open_batch_run(tracking, config, "job", "job"), config, "fingerprint")
    nowhere = str(tmp_path / "no-model")  # evaluating would fail on it
    base = evaluate_task(config.to_json(), tracking, subject_run, nowhere, str(subject_dir), str(tmp_path / "evaluation"))
    upscaled = evaluate_upscaled_task(config.to_json(), tracking, subject_run, nowhere, nowhere, str(subject_dir), str(tmp_path / "upscaled"))
    for outcome in (base, upscaled):
        assert outcome.metrics == {} and "switched off" in outcome.report_markdown
    assert not (tmp_path / "evaluation").exists() and not (tmp_path / "upscaled").exists()
    client = MlflowClient(tracking)
    stages = client.search_runs([client.get_run(subject_run).info.experiment_id], f"tags.`{TAG_PARENT}` = '{subject_run}'")
    assert {run.data.tags["dreambooth.evaluation"] for run in stages} == {"disabled"} and len(stages) == 2
