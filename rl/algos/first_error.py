"""First-error predictions from step values and ProcessBench's scores of them (pure; used by
PRM evaluation, PRM training and the `prm` head's on-policy refresh)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor


def first_error_from_step_values(values: Tensor | Sequence[float], threshold: float = 0.5) -> int:
    """Index of the first step whose value (P(still correct) after it) is below `threshold`,
    or -1 if none. values: [H]. A non-finite value is a ValueError."""
    vals = values.detach().flatten().tolist() if isinstance(values, Tensor) else list(values)
    for h, v in enumerate(vals):
        if not math.isfinite(v):
            raise ValueError(f"step value {h} is {v}")
        if v < threshold:
            return h
    return -1


def processbench_scores(predicted: Sequence[int], labels: Sequence[int]) -> dict[str, Any]:
    """ProcessBench's scores of first-error predictions against labels (both [N], -1 = none).

    acc_error: share of wrong solutions (label >= 0) whose prediction is exactly the label;
    acc_correct: share of right solutions (label -1) predicted -1; f1: their harmonic mean (0
    when either is 0). An accuracy over an empty subset is None, and so is f1 then. The
    wrong solutions' misses are split into `error_early` (an earlier step flagged),
    `error_late` (a later one) and `error_missed` (predicted -1).
    """
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels")
    pairs = list(zip(map(int, predicted), map(int, labels), strict=True))
    wrong = [(p, y) for p, y in pairs if y >= 0]
    right = [p for p, y in pairs if y < 0]
    hits_error = sum(p == y for p, y in wrong)
    hits_correct = sum(p == -1 for p in right)
    acc_error = hits_error / len(wrong) if wrong else None
    acc_correct = hits_correct / len(right) if right else None
    f1: float | None = None
    if acc_error is not None and acc_correct is not None:
        total = acc_error + acc_correct
        f1 = 2 * acc_error * acc_correct / total if total > 0 else 0.0
    return {
        "f1": f1,
        "acc_error": acc_error,
        "acc_correct": acc_correct,
        "n": len(pairs),
        "n_error": len(wrong),
        "n_correct": len(right),
        "hits_error": hits_error,
        "hits_correct": hits_correct,
        "error_early": sum(0 <= p < y for p, y in wrong),
        "error_late": sum(p > y for p, y in wrong),
        "error_missed": sum(p == -1 for p, _ in wrong),
    }
