"""The learning check: the same draws for both models, and a fine-tune lowers its subject's loss."""

from pathlib import Path

import pytest

from dreambooth.evaluation.learning import learning_check
from dreambooth.fine_tune import fine_tune
from dreambooth.ingest.photos import ingest_subject
from dreambooth.priors import generate_class_priors


def test_the_check_compares_like_with_like_and_sees_the_fine_tune_learn(make_config, subject_dir, tmp_path):
    config = make_config(priors={"num_class_images": 4, "sampler": {"num_inference_steps": 2}},
                         training={"max_steps": 8, "checkpoint_every": 100})
    identifier = ingest_subject(subject_dir, tmp_path / "subject", config).identifier.identifier
    generate_class_priors(config, tmp_path / "classes")

    # The base model against itself: the same noise, timesteps and latents give exactly the same loss.
    untouched = learning_check(config.model.base, tmp_path / "subject", tmp_path / "classes", identifier, config)
    assert untouched.subject_tuned == untouched.subject_base and untouched.class_tuned == untouched.class_base

    model = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "model").model_dir
    learned = learning_check(model, tmp_path / "subject", tmp_path / "classes", identifier, config)
    assert learned.subject_base == pytest.approx(untouched.subject_base)
    assert learned.metrics()["learn/subject_loss_change"] < -0.05  # measured: -16% after 8 steps of the tiny model
    assert set(learned.metrics()) >= {"learn/class_loss_base", "learn/class_loss_tuned", "learn/class_loss_change"}
    assert "| subject photos, subject prompt |" in learned.markdown()
    without_classes = learning_check(model, Path(tmp_path / "subject"), None, identifier, config)
    assert without_classes.class_base is None and "learn/class_loss_change" not in without_classes.metrics()
