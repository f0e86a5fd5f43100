"""What a stage cost: its accelerator-seconds on its node type, and an estimate from cost.prices; summed
per subject when its run closes and per batch by the summary; batch.budget reads the last subjects' costs.
"""

from __future__ import annotations

import sys
from typing import Optional

ACCELERATOR_SECONDS, ESTIMATED = "cost/accelerator_seconds", "cost/estimated"
HISTORY = 20  # trained subjects whose mean cost estimates the next one's


def node_type() -> tuple[str, int]:
    """(this node's type, accelerators the stage holds): the GPU's name as a price-table key, or cpu. A stage that
    never imported torch held no accelerator (the batch's CPU stages: they need not pay torch's import to say so)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-"), torch.cuda.device_count()
    return "cpu", 1


def stage_cost(seconds: float, prices: dict[str, float], earlier: Optional[dict] = None) -> tuple[str, dict[str, float]]:
    """(node type, cost metrics) of a stage that ran `seconds` here; `earlier`: its run's metrics from a
    previous attempt, which this one adds to."""
    node, accelerators = node_type()
    accelerator_seconds = seconds * accelerators + (earlier or {}).get(ACCELERATOR_SECONDS, 0.0)
    metrics = {ACCELERATOR_SECONDS: accelerator_seconds}
    if node in prices:
        metrics[ESTIMATED] = accelerator_seconds / 3600 * prices[node]
    return node, metrics


def summed(runs: list) -> dict[str, float]:
    """The cost metrics of several runs added up (an estimate only when some run has one)."""
    total = {ACCELERATOR_SECONDS: sum(run.data.metrics.get(ACCELERATOR_SECONDS, 0.0) for run in runs)}
    estimates = [run.data.metrics[ESTIMATED] for run in runs if ESTIMATED in run.data.metrics]
    if estimates:
        total[ESTIMATED] = sum(estimates)
    return total


def budget_refusal(budget: Optional[float], to_train: int, trained_runs: list, currency: str) -> str:
    """Why the batch may not start ("" when it may): its estimate, from the mean cost of the newest trained
    subjects, exceeds batch.budget. Without any costed history there is nothing to estimate from."""
    costs = [run.data.metrics[ESTIMATED] for run in trained_runs if ESTIMATED in run.data.metrics][:HISTORY]
    if budget is None or not costs or not to_train:
        return ""
    per_subject = sum(costs) / len(costs)
    estimate = per_subject * to_train
    if estimate <= budget:
        return ""
    return (f"batch.budget: {to_train} subjects to train x {per_subject:.2f} {currency} (mean of the last {len(costs)} trained) "
            f"= {estimate:.2f} {currency}, over the budget of {budget:.2f} {currency}")
