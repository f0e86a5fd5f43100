"""evaluation.safety_checker: diffusers' StableDiffusionSafetyChecker reads the evaluation's images, and a
model with any of them flagged is not registered, the reason on its run."""

from pathlib import Path

import pytest
import torch
import yaml

from conftest import SAMPLE_SUBJECT, cli
from dreambooth.config_files import CONFIG_DIR
from dreambooth.evaluation.safety import check_images
from dreambooth.images import list_images
from dreambooth.models.loading import resolve_model_source


@pytest.fixture(scope="module")
def strict_checker(tmp_path_factory) -> Path:
    """The tiny checker with every threshold below any cosine: the real model's rule then flags every image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    source = Path(resolve_model_source("tiny://safety-checker"))
    checker = StableDiffusionSafetyChecker.from_pretrained(source)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.5)
    folder = tmp_path_factory.mktemp("strict-checker")
    checker.save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text((source / "preprocessor_config.json").read_text())
    return folder


def test_the_checker_flags_by_its_thresholds_and_names_the_images(strict_checker):
    names = [path.name for path in list_images(SAMPLE_SUBJECT)]
    lenient = check_images("tiny://safety-checker", SAMPLE_SUBJECT, names)  # thresholds at cosine 1: nothing passes them
    assert lenient.passed and lenient.describe() == f"safety checker tiny://safety-checker: none of {len(names)} images flagged"
    strict = check_images(str(strict_checker), SAMPLE_SUBJECT, names, batch_size=3)
    assert strict.flagged == names and not strict.passed
    assert strict.describe().startswith(f"safety checker {strict_checker} flagged {len(names)} of {len(names)} images (00.jpg, ")


def test_a_flagged_model_is_not_registered_and_the_run_says_why(tiny_model_dir, strict_checker, tmp_path):
    from mlflow.tracking import MlflowClient

    from dreambooth.tracking import TAG_GATE, TAG_SAFETY, TAG_STAGE

    config = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    config["evaluation"].update({"safety_checker": str(strict_checker), "max_prompts_per_category": 1})
    (tmp_path / "checked.yaml").write_text(yaml.safe_dump(config))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cli("evaluate", "--config", str(tmp_path / "checked.yaml"), "--model", str(tiny_model_dir), "--identifier", "fqs",
                 "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--output-dir", str(tmp_path / "out"),
                 "--tracking-uri", tracking, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"quality gate: rejected (gate: safety checker {strict_checker} flagged 6 of 6 images (" in result.stdout
    mlflow = MlflowClient(tracking)
    (subject,) = mlflow.search_runs(["1"], f"tags.`{TAG_STAGE}` = 'subject'")
    assert subject.data.tags[TAG_GATE] == "rejected" and "flagged 6 of 6" in subject.data.tags[TAG_SAFETY]
    assert mlflow.search_registered_models() == []
