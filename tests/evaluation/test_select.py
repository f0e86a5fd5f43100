"""The checkpoint-selection rule on constructed score tables."""

import pytest

from dreambooth.evaluation.select import CheckpointScore, choose_checkpoint

# DINO rises with training while CLIP-T and PRES get worse: the shape the rule is for.
OVERFITTING = [
    CheckpointScore(step=200, dino=0.50, clip_i=0.70, clip_t=0.310, pres=0.40),
    CheckpointScore(step=400, dino=0.60, clip_i=0.76, clip_t=0.305, pres=0.45),
    CheckpointScore(step=600, dino=0.66, clip_i=0.79, clip_t=0.302, pres=0.52),
    CheckpointScore(step=800, dino=0.70, clip_i=0.81, clip_t=0.280, pres=0.60),
    CheckpointScore(step=1000, dino=0.72, clip_i=0.82, clip_t=0.260, pres=0.70),
]


def test_the_best_dino_among_checkpoints_that_keep_prompt_fidelity():
    chosen = choose_checkpoint(OVERFITTING, clip_t_margin=0.01)
    assert chosen.step == 600  # 800 and 1000 have more DINO but lost CLIP-T beyond the margin
    assert chosen.reason == "step 600: the best DINO (0.660) of 3 checkpoints with CLIP-T within 0.01 of the best (0.310)"
    assert choose_checkpoint(OVERFITTING, clip_t_margin=0.0).step == 200
    assert choose_checkpoint(OVERFITTING, clip_t_margin=1.0).step == 1000  # no constraint: the last, most faithful to the subject


def test_a_pres_bound_narrows_the_choice_and_says_so_when_nothing_meets_it():
    chosen = choose_checkpoint(OVERFITTING, clip_t_margin=0.01, max_pres=0.5)
    assert chosen.step == 400 and "and PRES <= 0.5" in chosen.reason
    fallback = choose_checkpoint(OVERFITTING, clip_t_margin=0.01, max_pres=0.1)
    assert fallback.step == 200 and "no checkpoint" in fallback.reason and "the lowest PRES among them (0.400)" in fallback.reason


def test_a_tie_goes_to_the_earlier_step():
    tied = [CheckpointScore(step, 0.6, 0.8, 0.3, 0.4) for step in (300, 100, 200)]
    assert choose_checkpoint(tied, clip_t_margin=0.01).step == 100


def test_nothing_to_choose_from_is_an_error():
    with pytest.raises(ValueError, match="no scored checkpoints"):
        choose_checkpoint([], clip_t_margin=0.01)


def test_with_select_the_fine_tune_task_keeps_the_model_of_the_step_the_rule_picks(make_config, subject_dir, tmp_path):
    import json
    from pathlib import Path

    from dreambooth.fine_tune import fine_tune
    from dreambooth.ingest.photos import ingest_subject
    from dreambooth.models.loading import LORA_WEIGHTS, METADATA_FILE
    from dreambooth.tasks.subject import keep_selected_checkpoint
    from dreambooth.training.saving import snapshot_folder

    select = {"every": 2, "prompts_per_category": 1, "images_per_prompt": 2, "pres_images": 2, "clip_t_margin": 0.0}
    config = make_config(priors={"enabled": False}, evaluation={"select": select},
                         training={"method": "lora", "max_steps": 5, "learning_rate": 5e-2, "checkpoint_every": 100, "keep_checkpoints": True})
    identifier = ingest_subject(subject_dir, tmp_path / "subject", config).identifier.identifier
    trained = fine_tune(tmp_path / "subject", None, identifier, config, tmp_path / "model")
    assert not trained.selection  # the fine-tune keeps the steps' models aside; the fine-tune task chooses
    result = keep_selected_checkpoint(trained, tmp_path / "subject", config)

    scores = [CheckpointScore(**score) for score in result.selection["scores"]]
    assert [score.step for score in scores] == [2, 4, 5]  # every 2 steps, and the last
    assert len({score.dino for score in scores}) == 3  # three different models were scored
    chosen = result.selection["step"]
    assert chosen == max(scores, key=lambda score: score.clip_t).step  # a margin of 0 leaves the best CLIP-T
    assert result.selection["reason"].startswith(f"step {chosen}: the best DINO")
    assert chosen < 5, "these seeds should make an earlier step the choice, so the kept model is not the last one"
    # The result is that step's model, not the last step's.
    kept = snapshot_folder(Path(result.checkpoints), chosen)  # kept with training.keep_checkpoints
    assert (tmp_path / "model" / LORA_WEIGHTS).read_bytes() == (kept / LORA_WEIGHTS).read_bytes()
    assert json.loads((tmp_path / "model" / METADATA_FILE).read_text())["step"] == chosen
    others = [snapshot_folder(Path(result.checkpoints), score.step) for score in scores if score.step != chosen]
    assert all((other / LORA_WEIGHTS).read_bytes() != (kept / LORA_WEIGHTS).read_bytes() for other in others)
