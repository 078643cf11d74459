"""The reward pipeline: outcome reward functions, then the process reward heads, into one
`Scored` per step.

The first reward function is the verifier: its scores (checked to lie in [0, 1]) are the
labels online heads learn from. Heads run in their configured order; each scores the batch
and learns from it (`update` before scoring when the head sets `update_first`), and their
token rewards are summed with the heads' weights. When any head rewards every token, every
response token is its own step for credit.

Every call into reward code runs under `reward.timeout_s` and `reward.on_error`
(`rewards.base.CallPolicy`): with `zero`, a function's failed rows and a failed head's whole
batch score 0 and are counted in `Scored.errors` (`reward/errors`). A head that fails on one
rank only while the others go on into a collective inside it leaves them waiting: the
collective timeout (`trainer.collective_timeout_s`) then ends the job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from rewards.base import (
    CallPolicy,
    RewardFn,
    RewardSpec,
    checked_verifier_scores,
    score_outcomes_guarded,
    warn_once,
)
from rewards.build import make_verifier
from rewards.heads import HeadContext, HeadOutput, RewardHead, checked_score
from rl.core.deadline import CallTimeout, call_with_timeout
from rl.core.errors import RewardCallError, RewardError, one_line
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
        policy: CallPolicy | None = None,
    ) -> None:
        self.functions = list(functions)
        self.policy = policy or CallPolicy()
        """Timeout and error policy of every call into reward code; `where` is set per step."""
        self.errors = 0
        """Rows zeroed for a failure in the last `score` or `outcomes` call."""
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

    @property
    def uses_rollout(self) -> bool:
        """Whether a head generates with the trainer's rollout backend while scoring."""
        return any(head.uses_rollout for head, _ in self.heads)

    def at(self, where: str) -> None:
        """Name the place of the next calls in error messages (e.g. `step 3, rank 1`)."""
        self.policy = dataclasses.replace(self.policy, where=where)

    def outcomes(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outcome rewards `[B]` (weighted total) and each function's `[B]` scores."""
        total, per_fn, self.errors = score_outcomes_guarded(
            self.functions, batch.prompts, batch.completions, batch.columns, self.policy
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
            return Scored(outcome, per_fn, errors=self.errors)
        started = time.perf_counter()
        steps = head_batch(self.tokenizer, batch, self.step_delimiter)
        labels = checked_verifier_scores(self.functions[0][0].fn, next(iter(per_fn.values())))
        process = torch.zeros_like(batch.response_mask, dtype=torch.float32)  # [B, Tr]
        metrics: dict[str, float] = {}
        keep: torch.Tensor | None = None  # [B] bool: rows every head keeps
        for head, weight in self.heads:
            if head.update_first:
                metrics.update(self._update(head, steps, labels))
            out = self._score_head(head, steps)
            process = process + weight * out.token_rewards.float().to(process.device)
            if out.keep is not None:
                keep = out.keep if keep is None else keep & out.keep
            metrics.update({f"head/{head.name}/{k}": v for k, v in out.metrics.items()})
            if not head.update_first:
                metrics.update(self._update(head, steps, labels))
        step_id, step_end = self._credit_steps(steps)
        self.heads_seconds = time.perf_counter() - started
        metrics = _mean_over_ranks(metrics)
        return Scored(outcome, per_fn, process, step_id, step_end, metrics, keep, self.errors)

    def _score_head(self, head: RewardHead, steps: HeadBatch) -> HeadOutput:
        """`checked_score` under the policy: with `zero`, a head that raises or times out
        gives its whole batch 0 (and its metrics are left out this step)."""
        try:
            return checked_score(head, steps, timeout_s=self.policy.timeout_s)
        except RewardCallError as e:
            message = f"{e}{self._where()}"
            if self.policy.on_error == "raise":
                raise RewardCallError(message) from e.__cause__
            warn_once(head.name, message)
            self.errors += steps.batch_size
            return HeadOutput(torch.zeros(steps.batch_size, steps.response_length))

    def _update(self, head: RewardHead, batch: HeadBatch, labels: torch.Tensor) -> dict[str, float]:
        """`head.update` under the policy, with a failure named after the head; with `zero`
        the update is skipped (its rows counted)."""
        try:
            stats = call_with_timeout(head.update, self.policy.timeout_s, batch, labels)
        except CallTimeout:
            cause = f"timed out after {self.policy.timeout_s:g} s (reward.timeout_s)"
            error: Exception | None = None
        except Exception as e:
            cause, error = f"raised {one_line(e)}", e
        else:
            return {f"head/{head.name}/{k}": float(v) for k, v in (stats or {}).items()}
        message = f"reward head {head.name!r}: update {cause}{self._where()}"
        if self.policy.on_error == "raise":
            raise RewardCallError(message) from error
        warn_once(head.name, message)
        self.errors += batch.batch_size
        return {}

    def _where(self) -> str:
        return f" ({self.policy.where})" if self.policy.where else ""

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


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric's mean over ranks (one all-reduce; every rank has the same keys)."""
    keys = sorted(metrics)
    reduced = eng.all_reduce_sum(torch.tensor([metrics[k] for k in keys], dtype=torch.float64))
    world = eng.world_size()
    return {k: float(v) / world for k, v in zip(keys, reduced, strict=True)}
