"""Credit diagnostics on the built-in task: where the advantages point on exactly labelled steps.

With `logging.credit_diagnostics: true` (needs `data.train: builtin:arith`, whose completions
have exact first-error labels), every training step also logs, over all ranks:

- `diag/zero_spread_group_frac`: share of prompt groups whose outcome rewards are all equal,
  so outcome-only credit gives their responses no signal at all.
- `diag/wrong_step_adv_neg_frac`, `diag/wrong_step_adv_mean`: over responses with a wrong
  step, the share of first wrong steps whose mean token advantage is negative, and its mean.
- `diag/right_step_adv_neg_frac`, `diag/right_step_adv_mean`: the same over right steps
  (every step before the first wrong one).
- `diag/right_step_in_failed_adv_neg_frac`: right steps of responses with a wrong final
  answer (outcome < 0.5) that are pushed down: outcome-only credit pushes all of them down,
  a step reward can spare them.
- `diag/wrong_step_no_step_credit_frac`: the share of those first wrong steps whose step
  credit (the advantage minus the outcome estimator's, `A - A_out`, averaged over the step's
  tokens) is zero: a step reward that cannot tell the step from its neighbours (for example
  a Monte-Carlo value estimated as 0 before and after it) leaves it to the outcome alone.
- `diag/step_credit_share`: `|A - A_out|^2 / (|A - A_out|^2 + |A_out|^2)` over response
  tokens, where `A_out` is the outcome estimator's advantage alone (`algo.advantage`; RLOO
  under prime, sum and min_form, whose outcome term it is by definition). The
  policy gradient is linear in the advantage, so this is the share of the advantage signal
  that step credit adds: a proxy for its share of the gradient, not a measured gradient
  norm (that would take a second backward pass). Not logged for `algo.credit=gae`, whose
  whitened GAE advantages have no outcome-only part.

With `logging.credit_grad_share: true` it also logs the measured gradient share
(`diag/step_credit_grad_share`, `diag/step_outcome_grad_cos`; rl.trainer.grad_share).

Evaluation then also logs `eval/clean_frac`: the share of held-out greedy answers whose every
step is right (`eval/accuracy` also counts chains that reach the right answer by chance).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rewards.gold_steps import first_error_steps
from rl.algos.advantages import ADVANTAGE_ESTIMATORS, group_rewards, token_advantages
from rl.algos.credit_specs import CreditSpec
from rl.config import Config, outcome_estimator
from rl.core.types import Credit, RolloutBatch, Scored
from rl.engine import deepspeed_engine as eng
from rl.rollout.steps import batch_steps
from rl.trainer.callbacks import TrainerCallback
from rl.trainer.grad_share import measured_grad_share

SUM_NAMES: tuple[str, ...] = (
    "groups",
    "zero_spread_groups",
    "wrong_steps",
    "wrong_steps_negative",
    "wrong_steps_adv",
    "wrong_steps_without_step_credit",
    "right_steps",
    "right_steps_negative",
    "right_steps_adv",
    "right_steps_in_failed",
    "right_steps_in_failed_negative",
    "outcome_adv_sq",
    "step_adv_sq",
)
"""The additive counts `diagnostic_sums` returns (summed over ranks, then divided; a ratio
over zero items is NaN, written as "NaN" in metrics.jsonl)."""

NO_CREDIT_ATOL = 1e-6
"""A step's mean step credit below this in magnitude counts as none (`A_out + alpha * 0`
equals `A_out` exactly; the tolerance only absorbs rounding where the outcome part is
recomputed differently)."""


def step_mean_advantages(
    advantages: Tensor, step_id: Tensor, n_steps: int
) -> tuple[Tensor, Tensor]:
    """Mean token advantage per step: advantages [B, Tr], step_id [B, Tr] (-1 off the
    response) -> (means [B, H], present [B, H] bool) with H = n_steps."""
    on = step_id >= 0
    index = step_id.clamp(min=0).long()
    sums = advantages.new_zeros(advantages.shape[0], n_steps).scatter_add_(
        1, index, torch.where(on, advantages, 0.0)
    )
    counts = advantages.new_zeros(advantages.shape[0], n_steps).scatter_add_(1, index, on.float())
    present = counts > 0
    return sums / counts.clamp(min=1.0), present


def diagnostic_sums(
    advantages: Tensor,
    outcome_advantages: Tensor,
    response_mask: Tensor,
    step_id: Tensor,
    first_error: Tensor,
    outcome: Tensor,
    group_size: int,
) -> Tensor:
    """The counts of `SUM_NAMES` for one rank's rows, float64 [len(SUM_NAMES)].

    advantages, outcome_advantages, response_mask, step_id: [B, Tr]; first_error [B] (the
    index of each response's first wrong step, -1 when all are right); outcome [B] (0/1).
    """
    n_steps = max(int(step_id.max()) + 1 if step_id.numel() else 0, 1)
    means, present = step_mean_advantages(advantages.float(), step_id, n_steps)
    mask = response_mask.float()
    extra = (advantages.float() - outcome_advantages.float()) * mask  # step credit [B, Tr]
    extra_means, _ = step_mean_advantages(extra, step_id, n_steps)
    steps = torch.arange(means.shape[1], device=means.device).unsqueeze(0)  # [1, H]
    first = first_error.unsqueeze(1)  # [B, 1]
    wrong = present & (steps == first)
    right = present & ((first < 0) | (steps < first))
    right_failed = right & (outcome < 0.5).unsqueeze(1)
    negative = means < 0
    grouped = group_rewards(outcome.float(), group_size)  # [P, K]
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    parts = [
        grouped.new_tensor(float(grouped.shape[0])),
        (spread == 0).sum(),
        wrong.sum(),
        (wrong & negative).sum(),
        means[wrong].sum(),
        (wrong & (extra_means.abs() < NO_CREDIT_ATOL)).sum(),
        right.sum(),
        (right & negative).sum(),
        means[right].sum(),
        right_failed.sum(),
        (right_failed & negative).sum(),
        ((outcome_advantages.float() * mask) ** 2).sum(),
        (extra**2).sum(),
    ]
    return torch.stack([p.double() for p in parts])


def diagnostics_row(sums: Tensor | list[float], with_share: bool = True) -> dict[str, float]:
    """The `diag/*` metrics from summed counts (a ratio over zero items is NaN, not 0)."""
    s = dict(zip(SUM_NAMES, [float(x) for x in sums], strict=True))

    def ratio(num: str, den: str) -> float:
        return s[num] / s[den] if s[den] > 0 else float("nan")

    row = {
        "diag/zero_spread_group_frac": ratio("zero_spread_groups", "groups"),
        "diag/wrong_step_adv_neg_frac": ratio("wrong_steps_negative", "wrong_steps"),
        "diag/wrong_step_adv_mean": ratio("wrong_steps_adv", "wrong_steps"),
        "diag/right_step_adv_neg_frac": ratio("right_steps_negative", "right_steps"),
        "diag/right_step_adv_mean": ratio("right_steps_adv", "right_steps"),
        "diag/right_step_in_failed_adv_neg_frac": ratio(
            "right_steps_in_failed_negative", "right_steps_in_failed"
        ),
    }
    if with_share:
        total = s["outcome_adv_sq"] + s["step_adv_sq"]
        row["diag/step_credit_share"] = s["step_adv_sq"] / total if total > 0 else float("nan")
        row["diag/wrong_step_no_step_credit_frac"] = ratio(
            "wrong_steps_without_step_credit", "wrong_steps"
        )
    return row


class CreditDiagnostics(TrainerCallback):
    """The `diag/*` metrics of each training step and `eval/clean_frac` of each evaluation
    (a callback of the loop: every rank calls it)."""

    def __init__(self, cfg: Config, tokenizer: Any, credit: CreditSpec) -> None:
        from rl.tasks.arith import ArithConfig

        self.tokenizer = tokenizer
        self.delimiter = cfg.reward.step_delimiter
        self.modulus = ArithConfig(**dict(cfg.data.task)).modulus
        # the outcome term the scheme itself adds: RLOO by definition for prime, sum and
        # min_form, whatever the (then unset) algo.advantage would default to
        rloo = credit.outcome_baseline == "rloo"
        estimator = "rloo" if rloo else outcome_estimator(cfg.algo)
        self.estimator = ADVANTAGE_ESTIMATORS.get(estimator)
        self.with_share = credit.separable
        self.grad_share = cfg.logging.credit_grad_share and self.with_share
        self.temperature = cfg.rollout.temperature

    def on_credit(
        self, trainer: Any, batch: RolloutBatch, scored: Scored, credit: Credit
    ) -> dict[str, Any]:
        size = trainer.cfg.trainer.forward_micro_batch_size or trainer.plan.micro_batch_size
        return self.row(batch, scored, credit, trainer.engine, size)

    def on_evaluate(self, trainer: Any, batch: RolloutBatch, n_real: int) -> dict[str, Any]:
        """`eval/clean_frac`: the share of evaluation answers with every step right."""
        totals = eng.all_reduce_sum(torch.tensor([self.clean_count(batch, n_real), float(n_real)]))
        return {"eval/clean_frac": float(totals[0] / totals[1])}

    def clean_count(self, batch: RolloutBatch, n_real: int) -> float:
        """How many of the first `n_real` completions have every step right (eval's
        `eval/clean_frac`: accuracy without the answers that are right by chance)."""
        from rl.tasks.arith import first_error_step

        problems = list(batch.columns["prompt"])[:n_real]
        completions = batch.completions[:n_real]
        return float(
            sum(
                first_error_step(p, c, self.modulus) < 0
                for p, c in zip(problems, completions, strict=True)
            )
        )

    def row(
        self,
        batch: RolloutBatch,
        scored: Scored,
        credit: Credit,
        policy: Any = None,
        micro_batch_size: int = 1,
    ) -> dict[str, float]:
        """The step's `diag/*` metrics; `policy` (the engine before the update) and its
        micro-batch size are needed for the measured gradient share only."""
        _, step_id = batch_steps(self.tokenizer, batch, self.delimiter)
        step_id = step_id.to(credit.advantages.device)
        first = first_error_steps(
            list(batch.columns["prompt"]), batch.completions, self.modulus, step_id
        )
        grouped = group_rewards(scored.outcome.float(), batch.group_size)  # [P, K]
        outcome_adv = token_advantages(self.estimator(grouped).reshape(-1), batch.response_mask)
        sums = diagnostic_sums(
            credit.advantages,
            outcome_adv,
            batch.response_mask,
            step_id,
            first,
            scored.outcome,
            batch.group_size,
        )
        row = diagnostics_row(eng.all_reduce_sum(sums).tolist(), self.with_share)
        if self.grad_share and policy is not None:
            row.update(
                measured_grad_share(
                    policy,
                    batch,
                    outcome_adv,
                    credit.advantages,
                    self.temperature,
                    micro_batch_size,
                )
            )
        return row
