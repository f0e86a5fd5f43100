"""Choosing the checkpoint before it overfits (`evaluation.select`).

Subject fidelity (DINO) keeps rising with training while prompt fidelity (CLIP-T) and prior
preservation (PRES) get worse. The fine-tune keeps the model of each named step aside; each is
scored by a quick evaluation (the first prompts of each category, few images, the same seeds for
every step). The rule keeps the checkpoints whose CLIP-T is within a margin of the best one (and
whose PRES is under a bound, when one is set) and picks the best DINO among them; a tie goes to the
earlier step, the less trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from dreambooth.config import SelectSettings

if TYPE_CHECKING:  # evaluate loads torch; choosing a step does not
    from dreambooth.evaluation.evaluate import EvaluationInputs


@dataclass(frozen=True)
class CheckpointScore:
    """A checkpoint's quick evaluation: the same prompts and seeds at every step."""

    step: int
    dino: float
    clip_i: float
    clip_t: float
    pres: float


@dataclass(frozen=True)
class Selection:
    step: int
    reason: str  # recorded on the subject's run


def choose_checkpoint(scores: list[CheckpointScore], clip_t_margin: float, max_pres: Optional[float] = None) -> Selection:
    """The step the rule picks among `scores` (at least one), and why."""
    if not scores:
        raise ValueError("no scored checkpoints to choose from")
    best_clip_t = max(score.clip_t for score in scores)
    floor = best_clip_t - clip_t_margin
    prompt_faithful = [score for score in scores if score.clip_t >= floor]
    rule = f"CLIP-T within {clip_t_margin:g} of the best ({best_clip_t:.3f})"
    if max_pres is not None:
        preserving = [score for score in prompt_faithful if score.pres <= max_pres]
        if not preserving:
            chosen = min(prompt_faithful, key=lambda score: (score.pres, score.step))
            return Selection(chosen.step, f"step {chosen.step}: no checkpoint with {rule} has PRES <= {max_pres:g}; "
                                          f"the lowest PRES among them ({chosen.pres:.3f})")
        prompt_faithful, rule = preserving, f"{rule} and PRES <= {max_pres:g}"
    chosen = max(prompt_faithful, key=lambda score: (score.dino, -score.step))
    others = len(prompt_faithful) - 1
    return Selection(chosen.step, f"step {chosen.step}: the best DINO ({chosen.dino:.3f}) of {others + 1} checkpoint"
                                  f"{'s' if others else ''} with {rule}")


def quick_protocol(inputs: EvaluationInputs) -> EvaluationInputs:
    """The run's evaluation settings cut down to evaluation.select's sizes."""
    select = inputs.evaluation.select
    quick = inputs.evaluation.model_copy(update={
        "max_prompts_per_category": select.prompts_per_category, "images_per_prompt": select.images_per_prompt,
        "pres_images": select.pres_images, "num_processes": 1,
    })
    return replace(inputs, evaluation=quick)


def score_checkpoints(snapshots: dict[int, Path], subject_dir: Path, inputs: EvaluationInputs, scratch: Path) -> list[CheckpointScore]:
    """Each step's model (step -> result folder) by the quick protocol."""
    from dreambooth.evaluation.evaluate import evaluate_model

    quick = quick_protocol(inputs)
    scores = []
    for step, folder in sorted(snapshots.items()):
        overall = evaluate_model(str(folder), subject_dir, quick, scratch / f"step-{step:06d}").overall
        scores.append(CheckpointScore(step, overall["dino"], overall["clip_i"], overall["clip_t"], overall["pres"]))
    return scores


def selection_record(scores: list[CheckpointScore], select: SelectSettings) -> dict:
    """The rule's choice with every step's scores: what the fine-tune records and the run shows."""
    chosen = choose_checkpoint(scores, select.clip_t_margin, select.max_pres)
    return {"step": chosen.step, "reason": chosen.reason, "scores": [asdict(score) for score in scores]}
