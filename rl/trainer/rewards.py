"""The reward pipeline: outcome reward functions, then the process reward heads, into one
`Scored` per step.

The first reward function is the verifier: its scores (checked to lie in [0, 1]) are the
labels online heads learn from. Heads run in their configured order; each scores the batch
and learns from it (`update` before scoring when the head sets `update_first`), and their
token rewards are summed with the heads' weights. When any head rewards every token, every
response token is its own step for credit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from rewards.base import RewardFn, RewardSpec, checked_verifier_scores, score_outcomes
from rewards.build import make_verifier
from rewards.heads import HeadContext, RewardHead, checked_score
from rl.core.errors import RewardError, one_line
from rl.core.types import HeadBatch, RolloutBatch, Scored
from rl.engine import deepspeed_engine as eng
from rl.rollout.steps import head_batch


class RewardPipeline:
    """Reward functions + heads for one run; every rank builds one."""

    def __init__(
        self,
        functions: Sequence[tuple[RewardSpec, RewardFn]],
        heads: Sequence[tuple[RewardHead, float]],
        tokenizer: object,
        step_delimiter: str,
    ) -> None:
        self.functions = list(functions)
        self.heads = list(heads)
        self.tokenizer = tokenizer
        self.step_delimiter = step_delimiter
        self.verifier = make_verifier(self.functions[0][0])
        """The first reward function on any completions: [N] in [0, 1] (for heads)."""
        self.heads_seconds = 0.0
        """Wall time of the heads (steps, scoring, updates) in the last `score`."""

    def setup(self, ctx: HeadContext) -> None:
        for head, _ in self.heads:
            head.setup(ctx)

    def outcomes(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outcome rewards `[B]` (weighted total) and each function's `[B]` scores."""
        total, per_fn = score_outcomes(
            self.functions, batch.prompts, batch.completions, batch.columns
        )
        bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"outcome reward is not finite at batch rows {bad[:8]}")
        device = batch.device
        return total.to(device), {name: r.to(device) for name, r in per_fn.items()}

    def score(self, batch: RolloutBatch) -> Scored:
        """Outcome rewards, then (with heads) the combined process rewards and their steps."""
        outcome, per_fn = self.outcomes(batch)
        if not self.heads:
            return Scored(outcome, per_fn)
        started = time.perf_counter()
        steps = head_batch(self.tokenizer, batch, self.step_delimiter)
        labels = checked_verifier_scores(self.functions[0][0].fn, next(iter(per_fn.values())))
        process = torch.zeros_like(batch.response_mask, dtype=torch.float32)  # [B, Tr]
        metrics: dict[str, float] = {}
        keep: torch.Tensor | None = None  # [B] bool: rows every head keeps
        for head, weight in self.heads:
            if head.update_first:
                metrics.update(_update(head, steps, labels))
            out = checked_score(head, steps)
            process = process + weight * out.token_rewards.float().to(process.device)
            if out.keep is not None:
                keep = out.keep if keep is None else keep & out.keep
            metrics.update({f"head/{head.name}/{k}": v for k, v in out.metrics.items()})
            if not head.update_first:
                metrics.update(_update(head, steps, labels))
        step_id, step_end = self._credit_steps(steps)
        self.heads_seconds = time.perf_counter() - started
        return Scored(outcome, per_fn, process, step_id, step_end, _mean_over_ranks(metrics), keep)

    def _credit_steps(self, steps: HeadBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(step_id, step_end) [B, Tr] that credit reads: the response's steps, or every
        token its own step when some head rewards tokens."""
        if not any(head.granularity == "token" for head, _ in self.heads):
            return steps.step_id, steps.step_end
        mask = steps.response_mask.float()
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, Tr]
        return torch.where(mask.bool(), positions, -1), mask

    def close(self) -> None:
        for head, _ in self.heads:
            head.close()


def drop_rows(batch: RolloutBatch, keep: torch.Tensor | None) -> None:
    """Zero the response mask of the rows a head dropped (`keep: [B]` bool; None keeps all),
    in place: those rows then add no gradient and no tokens to the loss's global counts, as
    `rollout.mask_truncated` does for truncated rows. Their outcomes still enter their
    groups' baselines."""
    if keep is not None:
        mask = batch.response_mask
        batch.response_mask = mask * keep.to(device=mask.device, dtype=mask.dtype).unsqueeze(1)


def _update(head: RewardHead, batch: HeadBatch, labels: torch.Tensor) -> dict[str, float]:
    """`head.update`, with a failure named after the head."""
    try:
        stats = head.update(batch, labels)
    except Exception as e:
        raise RewardError(f"reward head {head.name!r}: update raised {one_line(e)}") from e
    return {f"head/{head.name}/{k}": float(v) for k, v in (stats or {}).items()}


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric's mean over ranks (one all-reduce; every rank has the same keys)."""
    keys = sorted(metrics)
    reduced = eng.all_reduce_sum(torch.tensor([metrics[k] for k in keys], dtype=torch.float64))
    world = eng.world_size()
    return {k: float(v) / world for k, v in zip(keys, reduced, strict=True)}
