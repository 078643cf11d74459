"""`gold_steps`: step rewards from the built-in task's exact first-error labels.

The upper bound of any learned process reward on `builtin:arith`, at no cost: no model, no
extra rollouts. Each response's first wrong step (`rl.tasks.arith.first_error_step` on the
completion, the problem read from the row's `prompt` column) gets `-penalty` on its last
token; every other token gets 0. A response that stops before its first missing line is
penalised on its last step. Its step values (for PRM evaluation) are 1 before the first
wrong step and 0 from it on, so its first-error F1 on the task's labels is 1.

Credit: `pav` by default (the step reward as the process advantage, added with weight
`alpha` to the outcome advantage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rewards.heads import REWARD_HEADS, HeadBatch, HeadContext, HeadOutput, RewardHead
from rl.core.errors import ConfigError


@dataclass(frozen=True)
class GoldStepsOptions:
    """`reward.heads[i].kwargs` of the `gold_steps` head."""

    penalty: float = 1.0
    """Reward on the last token of the first wrong step is `-penalty`."""


@REWARD_HEADS.register("gold_steps")
class GoldStepsHead(RewardHead):
    """Exact first-error step rewards of the built-in arithmetic task."""

    name = "gold_steps"
    granularity = "step"
    default_credit = "pav"
    Options = GoldStepsOptions

    def __init__(self, penalty: float = 1.0) -> None:
        if penalty <= 0:
            raise ConfigError(f"gold_steps head: penalty must be > 0, got {penalty}")
        self.penalty = penalty
        self.modulus: int | None = None

    def setup(self, ctx: HeadContext) -> None:
        """The task's modulus, from `data.task` (the prompts do not carry it)."""
        from rl.tasks.arith import ArithConfig

        if ctx.cfg is not None:
            self.modulus = ArithConfig(**dict(ctx.cfg.data.task)).modulus

    def first_errors(self, batch: HeadBatch, missing_is_error: bool = True) -> Tensor:
        """[B] index of each response's first wrong step (-1: all right), clamped to the
        response's last step when the error is a missing line (or, with `missing_is_error`
        False, -1 then: a right partial solution)."""
        from rl.tasks.arith import DEFAULT_MODULUS

        modulus = self.modulus or DEFAULT_MODULUS
        prompts = _prompt_column(batch)
        return first_error_steps(
            prompts, batch.completions, modulus, batch.step_id, missing_is_error
        )

    def score(self, batch: HeadBatch) -> HeadOutput:
        first = self.first_errors(batch)  # [B]
        at_error = batch.step_end.bool() & (batch.step_id == first.unsqueeze(1))  # [B, Tr]
        # share of responses penalised (an empty response has no step to penalise)
        wrong = float(at_error.any(dim=1).float().mean()) if len(first) else 0.0
        rewards = -self.penalty * at_error.float()
        return HeadOutput(token_rewards=rewards, metrics={"wrong_step_frac": wrong})

    def step_values(self, batch: HeadBatch) -> Tensor:
        """[B, Tr] 1 on tokens of steps before the first wrong one, 0 from it on and off
        the response. The lines a response has not written yet are not errors here (a
        partial solution, as in step-level search, is right so far); `score` penalises a
        response that stopped early."""
        first = self.first_errors(batch, missing_is_error=False).unsqueeze(1)  # [B, 1]
        ok = (first < 0) | (batch.step_id < first)
        return ((batch.step_id >= 0) & ok).float()


def first_error_steps(
    problems: list[Any],
    completions: list[str],
    modulus: int,
    step_id: Tensor,
    missing_is_error: bool = True,
) -> Tensor:
    """[B] first wrong step of each completion of the built-in task (-1: all right), clamped
    to the response's last step (from `step_id` [B, Tr], -1 off the response) when the error
    is a missing line, so that the index always names a step the response has; with
    `missing_is_error` False a missing line is no error (-1)."""
    from rl.tasks.arith import first_error_step

    first = torch.tensor(
        [first_error_step(p, c, modulus) for p, c in zip(problems, completions, strict=True)],
        device=step_id.device,
    )
    last_step = step_id.max(dim=1).values  # [B], -1 for an empty response
    if not missing_is_error:
        first = torch.where(first > last_step, -1, first)
    return torch.where(first >= 0, torch.minimum(first, last_step.clamp(min=0)), first)


def _prompt_column(batch: HeadBatch) -> list[Any]:
    """The rows' raw problems (`prompt` column); ConfigError naming the head without it."""
    prompts = batch.columns.get("prompt")
    if prompts is None:
        raise ConfigError(
            "gold_steps head: needs the built-in task's `prompt` column (data.train: "
            f"builtin:arith); the rows have {sorted(batch.columns)}"
        )
    return list(prompts)
