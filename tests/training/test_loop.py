"""The shared training loop: checkpoints, retention, exact resume and the NaN stop."""

import numpy as np
import pytest
import torch
from torch import nn

from dreambooth.config import EmaSettings, TrainingSettings
from dreambooth.errors import TrainingDiverged
from dreambooth.training.loop import list_checkpoints, train
from dreambooth.training.losses import LossTerms


def _regression_loss(modules, step, generator):
    inputs = torch.randn(8, 4, generator=generator)
    target = inputs.sum(dim=1, keepdim=True)
    loss = nn.functional.mse_loss(modules["model"](inputs), target)
    return LossTerms(total=loss, instance=loss)


def _fresh_model():
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def _settings(**changes):
    values = dict(learning_rate=1e-2, max_steps=6, checkpoint_every=2, checkpoints_total_limit=2)
    return TrainingSettings(**{**values, **changes})


def test_checkpoints_keep_only_the_newest(tmp_path):
    train({"model": _fresh_model()}, {"model": 1e-2}, _regression_loss, _settings(max_steps=9), tmp_path)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-000006", "step-000008"]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    uninterrupted = train({"model": _fresh_model()}, {"model": 1e-2}, _regression_loss, _settings(), tmp_path / "a")

    def interrupted_at_step_5(modules, step, generator):
        if step == 5:
            raise KeyboardInterrupt  # as a kill would, after the step-4 checkpoint
        return _regression_loss(modules, step, generator)

    with pytest.raises(KeyboardInterrupt):
        train({"model": _fresh_model()}, {"model": 1e-2}, interrupted_at_step_5, _settings(), tmp_path / "b")
    resumed = train({"model": _fresh_model()}, {"model": 1e-2}, _regression_loss, _settings(), tmp_path / "b")

    assert resumed.resumed_from_step == 4
    for expected, actual in zip(uninterrupted.modules["model"].parameters(), resumed.modules["model"].parameters()):
        torch.testing.assert_close(actual, expected)


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    train({"model": _fresh_model()}, {"model": 1e-2}, _regression_loss, _settings(max_steps=3), tmp_path)
    (tmp_path / "step-000010").mkdir()  # no completion marker: interrupted while saving
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-000002"]


def test_a_nan_loss_stops_training_with_the_step(tmp_path):
    def diverging(modules, step, generator):
        terms = _regression_loss(modules, step, generator)
        return LossTerms(total=terms.total * float("nan"), instance=terms.instance) if step == 3 else terms

    with pytest.raises(TrainingDiverged, match=r"step 3: loss is nan \(last checkpoint: .*step-000002\)"):
        train({"model": _fresh_model()}, {"model": 1e-2}, diverging, _settings(), tmp_path)


def test_logged_metrics_include_the_learning_rate(tmp_path):
    logged = []
    train(
        {"model": _fresh_model()},
        {"model": 1e-2},
        _regression_loss,
        _settings(max_steps=4, lr_scheduler="linear"),
        tmp_path,
        on_log=lambda step, values: logged.append((step, values)),
    )
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert logged[0][1]["lr"] > logged[-1][1]["lr"]
    assert set(logged[0][1]) == {"loss", "instance_loss", "lr"}


@pytest.mark.parametrize(
    "batch, accumulation, processes, per_process",
    [(4, 1, 2, (2, 1)), (1, 4, 2, (1, 2)), (6, 2, 3, (2, 2)), (3, 1, 1, (3, 1))],
)
def test_the_effective_batch_is_shared_by_the_processes(batch, accumulation, processes, per_process):
    from dreambooth.training.loop import split_batch

    shared = split_batch(_settings(batch_size=batch, gradient_accumulation_steps=accumulation), processes)
    assert (shared.batch_size, shared.gradient_accumulation_steps) == per_process
    assert shared.batch_size * shared.gradient_accumulation_steps * processes == batch * accumulation


def test_an_effective_batch_the_processes_cannot_share_is_refused():
    from dreambooth.errors import InputError
    from dreambooth.training.loop import split_batch

    with pytest.raises(InputError, match="batch_size 3 x gradient_accumulation_steps 1 cannot be shared by 2 processes"):
        split_batch(_settings(batch_size=3, gradient_accumulation_steps=1), 2)


def test_a_process_that_trained_before_trains_again_with_its_new_precision_and_accumulation():
    """accelerate keeps both process-wide; fresh_accelerator clears them (through accelerate's private reset)."""
    from dreambooth.training.loop import fresh_accelerator

    first = fresh_accelerator(_settings(gradient_accumulation_steps=4, mixed_precision="bf16"))
    assert (first.gradient_accumulation_steps, first.mixed_precision) == (4, "bf16")
    again = fresh_accelerator(_settings(gradient_accumulation_steps=1, mixed_precision="no"))
    assert (again.gradient_accumulation_steps, again.mixed_precision) == (1, "no")


def test_ema_holds_the_average_of_the_steps_weights_and_a_resume_keeps_averaging(tmp_path):
    settings = _settings(ema=EmaSettings(decay=0.6, start_step=2))
    model, raw = _fresh_model(), {}
    averaged_at_4 = []

    def record(step):
        (averaged_at_4 if step == 4 else raw.setdefault(step, [])).append(model.weight.detach().clone())

    result = train({"model": model}, {"model": 1e-2}, _regression_loss, settings, tmp_path / "a", on_step=record, averaged_steps=(4,))
    # The average, by hand from an unaveraged twin run's weights after each step: the weights at
    # start_step, then each step's mixed in at the warmed-up decay.
    average, updates, expected_at_4 = None, 0, None
    weights_by_step = {}
    twin = _fresh_model()
    train({"model": twin}, {"model": 1e-2}, _regression_loss, _settings(), tmp_path / "twin",
          on_step=lambda step: weights_by_step.__setitem__(step, twin.weight.detach().clone()))
    for step in range(1, 7):
        if step <= 2:
            average = weights_by_step[step].clone()
            continue
        decay = min(0.6, (1 + updates) / (10 + updates))
        average = decay * average + (1 - decay) * weights_by_step[step]
        updates += 1
        if step == 4:
            expected_at_4 = average.clone()
    torch.testing.assert_close(result.modules["model"].weight.detach(), average)
    torch.testing.assert_close(averaged_at_4[0], expected_at_4)  # a snapshot step sees the average...
    torch.testing.assert_close(raw[5][0], weights_by_step[5])  # ...and training goes on from the raw weights
    assert not torch.allclose(average, weights_by_step[6])

    def interrupted_at_step_5(modules, step, generator):
        if step == 5:
            raise KeyboardInterrupt
        return _regression_loss(modules, step, generator)

    with pytest.raises(KeyboardInterrupt):
        train({"model": _fresh_model()}, {"model": 1e-2}, interrupted_at_step_5, settings, tmp_path / "b")
    resumed = train({"model": _fresh_model()}, {"model": 1e-2}, _regression_loss, settings, tmp_path / "b")
    assert resumed.resumed_from_step == 4
    torch.testing.assert_close(resumed.modules["model"].weight.detach(), average)


def test_prodigy_finds_its_own_step_size_and_refuses_an_adamw_learning_rate(tmp_path):
    from prodigyopt import Prodigy

    optimizers = []
    original_step = Prodigy.step

    def counting_step(self, *args, **kwargs):
        optimizers.append(self)
        return original_step(self, *args, **kwargs)

    Prodigy.step = counting_step
    try:
        losses = []
        train({"model": _fresh_model()}, {"model": 1.0}, _regression_loss,
              _settings(optimizer="prodigy", learning_rate=1.0, max_steps=100, checkpoint_every=1000), tmp_path,
              on_log=lambda step, values: losses.append(values["loss"]))
    finally:
        Prodigy.step = original_step
    group = optimizers[-1].param_groups[0]
    assert group["d"] > 100 * group["d0"]  # its estimate of the step size grew from the tiny d0
    assert group["use_bias_correction"] and group["safeguard_warmup"]
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])
    with pytest.raises(ValueError, match="learning_rate: 5e-06 with optimizer prodigy"):
        TrainingSettings(optimizer="prodigy")
