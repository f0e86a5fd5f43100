"""Choosing the checkpoint before it overfits (issue 20's `evaluation.select`, the rule alone).

Subject fidelity (DINO) keeps rising with training while prompt fidelity (CLIP-T) and prior
preservation (PRES) get worse. Given the quick scores of each checkpoint, the rule keeps the
checkpoints whose CLIP-T is within a margin of the best one (and whose PRES is under a bound, when
one is set) and picks the best DINO among them; a tie goes to the earlier step, the less trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
