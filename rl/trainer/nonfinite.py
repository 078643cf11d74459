"""Non-finite numbers in the update: find them, skip the optimizer step on every rank, count,
and stop the run after `trainer.max_skipped_steps` skipped steps in a row.

Two guards, both taking the same decision on every rank:
- before the update, the update's inputs (advantages, and the old / reference / sampler
  log-probs, on response tokens) are checked on each rank and the verdict all-reduced: one
  rank with a NaN skips the whole update everywhere (`inputs_verdict`);
- during it, a non-finite loss or gradient makes the all-reduced gradient non-finite, which
  DeepSpeed's ZeRO and bf16 optimizers (and `FiniteAdamW` without ZeRO) detect and skip;
  the learners count those steps (`rl.trainer.learners.run_updates`).

A log-prob of -inf is not a fault here: the log-ratio is clamped before exp
(`rl.algos.losses.safe_ratio`). NaN is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rl.core.errors import HaltError
from rl.core.types import Credit, LogProbs
from rl.engine import deepspeed_engine as eng

SKIP_KEYS = ("train/skipped_steps", "critic/skipped_steps")
"""Metrics that count the optimizer steps skipped in a training step."""


def local_fault(credit: Credit, logprobs: LogProbs, mask: torch.Tensor) -> str | None:
    """The first update input holding a bad number on a response token of this rank, or None.

    credit.advantages: [B, Tr] (NaN or inf is bad); logprobs.old / ref / behaviour: [B, Tr]
    (NaN is bad; -inf is clamped in the ratio); mask: [B, Tr].
    """
    m = mask.bool()
    if not torch.isfinite(credit.advantages[m]).all():
        return "advantages"
    for name, values in (("old", logprobs.old), ("ref", logprobs.ref)):
        if values is not None and torch.isnan(values[m]).any():
            return f"{name} log-probs"
    if logprobs.behaviour is not None and torch.isnan(logprobs.behaviour[m]).any():
        return "sampler log-probs"
    return None


def inputs_verdict(fault: str | None, rank: int, world_size: int) -> str | None:
    """One all-reduce: None when no rank found a fault, else e.g. `non-finite advantages on
    rank 1` (every rank that found one). Collective."""
    flags = torch.zeros(world_size, dtype=torch.float64)  # [world]
    flags[rank] = 1.0 if fault is not None else 0.0
    bad = eng.all_reduce_sum(flags).nonzero().flatten().tolist()
    if not bad:
        return None
    what = f"non-finite {fault}" if fault is not None else "non-finite update inputs"
    return f"{what} on rank {', '.join(map(str, bad))}"


def skipped_update_stats(optimizer_steps: int, critic: bool) -> dict[str, float]:
    """The update's stats when its inputs were bad: every optimizer step skipped."""
    row = {"train/skipped_steps": float(optimizer_steps)}
    if critic:
        row["critic/skipped_steps"] = float(optimizer_steps)
    return row


@dataclass
class SkipTracker:
    """Skipped optimizer steps since the last training step that had none."""

    limit: int
    """`trainer.max_skipped_steps`: halt when this many are skipped in a row."""
    in_a_row: int = 0

    def record(self, row: dict[str, Any]) -> int:
        """Count the step's skipped optimizer steps (the most of any learner); returns it."""
        skipped = int(max(float(row.get(key, 0.0)) for key in SKIP_KEYS))
        self.in_a_row = self.in_a_row + skipped if skipped else 0
        return skipped

    def check(self, step: int, last_good: str) -> None:
        """HaltError once `limit` optimizer steps in a row were skipped."""
        if self.in_a_row >= self.limit:
            raise HaltError(
                f"step {step}: {self.in_a_row} optimizer steps in a row skipped for non-finite "
                f"numbers (trainer.max_skipped_steps={self.limit}); stopping. Newest good "
                f"checkpoint: {last_good}. Lower optim.lr or check the rewards, then resume "
                "with trainer.resume=auto"
            )


def final_step_error(step: int, skipped: int, last_good: str) -> HaltError:
    """Raised instead of writing the final model when the last step was skipped."""
    return HaltError(
        f"step {step} (the last): {skipped} optimizer step(s) skipped for non-finite numbers; "
        f"the final model is not written. Newest good checkpoint: {last_good}"
    )
