"""Step rewards from a discriminative PRM's step probabilities: shaping and agreement filtering.

Pure tensor maths (imports torch and pure `rl.*` modules only). Input: `p: [B, H]`, the PRM's
probability that step h of row b is good, and `step_mask: [B, H]` (1 on valid steps, which
come first in each row; padding after; a row may have no step). Output: step rewards
`[B, H]`, 0 on padding, which the `prm` reward head places on each step's last token
(`rl.algos.credit.steps_to_tokens`). Steps are 0-based here (h = 0..H-1), 1-based in
docs/algorithms.md.

Shapings (`PRM_SHAPINGS`, one signature `fn(p, step_mask, params) -> [B, H]`):

- `prob`: `r_h = p_h`, the plain probability.
- `min` (PURE, Cheng et al. 2025, arXiv 2504.15275): `r_h = p_h - 1`, the input of the
  `min_form` credit scheme (`rl.algos.credit.min_form_step_rewards` turns it into
  `w_h r_h`, `w = softmax(-r / T)`). Why `p_h - 1` and not `p_h`: the weights are the same
  for both (softmax is shift invariant) and the sequence total differs by a constant that the
  scheme's leave-one-out baseline cancels, but the *return-to-go* does not. `min_form`
  normalises the weights over all steps of a response, so after the worst step the remaining
  weights are tiny and the return-to-go falls to about 0. With `p_h` in [0, 1] that 0 is the
  worst value a step can have: every step after the minimum (and, in a flawless response,
  every later step, as 1/H of the weight drops out per step) is pushed down for its position
  alone. With `p_h - 1` a good step is worth about 0, so "about 0 after the minimum" is what
  good remaining steps deserve, and the return-to-go of step h approximates PURE's own
  `min_{h' >= h} r_h'` (the two differ only by how bad the steps after the minimum are).
  A step can only lose reward, as in Clip, so padding with safe steps never pays.
- `clip` (Gao et al. 2024, arXiv 2410.15115, "Clip"): `r_h = min(p_h - eta, 0)`.
- `delta` (Gao et al. 2024, "Delta"): `r_h = p_h - p_{h+1}` for every step but the last,
  and `r_{H-1} = p_{H-1}` on the last, so the return-to-go from step h telescopes to `p_h`:
  the PRM's own score of the step, whatever the number of steps after it. (The paper's
  description in ALGORITHMS.md stops the sum at `p_1 - p_H`; keeping the last term makes the
  total `p_1` and the return of every step its own score.)
- `first_error`: `-penalty` on the first step with `p_h < threshold`, 0 on every other step
  (a learned counterpart of the `gold_steps` head).

`SHAPING_CREDIT` names the credit scheme each shaping is meant for (the head's
`default_credit`): `min` -> `min_form`; `delta` -> `sum` (its telescoping is a property of the
return-to-go; under `pav` credit step h would be rewarded for the *next* step's drop);
`prob`, `clip`, `first_error` -> `pav` (each step's own reward added to the outcome
advantage of its tokens, as the `gold_steps` and `pav` heads do).

Agreement filtering (PROF, arXiv 2509.03403), `agreement_keep`: keep for the update only the
responses whose PRM verdict agrees with the outcome: a right response (outcome >= 0.5) whose
step score is >= `threshold`, or a wrong one whose step score is below it. The step score is
the mean of the response's step probabilities (default; PROF's consistency is a mean of step
rewards) or their minimum (`reduce="min"`: one bad step makes the verdict "wrong", the
ProcessBench reading). Rows without steps have no PRM verdict and are kept. Departures from
the paper: PROF ranks the responses of each over-sampled group by this consistency and keeps a
fixed number of them (balancing right and wrong ones); here a fixed threshold decides each
response on its own, so the number kept varies from group to group, and nothing is
over-sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.core.errors import ConfigError
from rl.core.registry import Registry

AGREEMENT_REDUCTIONS: tuple[str, ...] = ("mean", "min")
"""How a response's step probabilities become the one score the agreement filter compares."""


@dataclass(frozen=True)
class ShapingParams:
    """The numbers the shapings read (each uses only its own)."""

    eta: float = 0.5
    """`clip`: the probability below which a step loses reward, `r_h = min(p_h - eta, 0)`."""
    threshold: float = 0.5
    """`first_error`: a step with `p_h < threshold` is wrong (also the agreement filter's)."""
    penalty: float = 1.0
    """`first_error`: the reward of the first wrong step is `-penalty`."""


Shaping = Callable[[Tensor, Tensor, ShapingParams], Tensor]
"""`fn(p [B, H], step_mask [B, H], params) -> step rewards [B, H]`, 0 on padding."""

PRM_SHAPINGS: Registry[Shaping] = Registry("prm shaping")
SHAPING_CREDIT: dict[str, str] = {}
"""The credit scheme each shaping is meant for (see the module docstring)."""


def register_shaping(name: str, credit: str) -> Callable[[Shaping], Shaping]:
    """Register a shaping under `name`, with the credit scheme it is meant for."""

    def add(fn: Shaping) -> Shaping:
        PRM_SHAPINGS.register(name)(fn)
        SHAPING_CREDIT[name] = credit
        return fn

    return add


def checked_steps(p: Tensor, step_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(p as float, valid steps as bool), both [B, H]; ValueError on mismatched shapes or a
    step mask whose valid steps are not a prefix of each row."""
    if p.ndim != 2 or p.shape != step_mask.shape:
        raise ValueError(
            f"expected p and step_mask of one shape [B, H], got {tuple(p.shape)} and "
            f"{tuple(step_mask.shape)}"
        )
    valid = step_mask.bool()
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("step_mask must mark each row's valid steps first (a prefix)")
    return (p if p.is_floating_point() else p.float()), valid


def _on_steps(rewards: Tensor, valid: Tensor) -> Tensor:
    """rewards [B, H] with padded steps set to 0."""
    return torch.where(valid, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))


@register_shaping("prob", credit="pav")
def prob_rewards(p: Tensor, step_mask: Tensor, params: ShapingParams) -> Tensor:
    """`r_h = p_h`: [B, H] -> [B, H]."""
    p, valid = checked_steps(p, step_mask)
    return _on_steps(p, valid)


@register_shaping("min", credit="min_form")
def min_rewards(p: Tensor, step_mask: Tensor, params: ShapingParams) -> Tensor:
    """`r_h = p_h - 1` (in [-1, 0]), for the `min_form` credit scheme: [B, H] -> [B, H]."""
    p, valid = checked_steps(p, step_mask)
    return _on_steps(p - 1.0, valid)


@register_shaping("clip", credit="pav")
def clip_rewards(p: Tensor, step_mask: Tensor, params: ShapingParams) -> Tensor:
    """`r_h = min(p_h - eta, 0)`: [B, H] -> [B, H]."""
    p, valid = checked_steps(p, step_mask)
    return _on_steps((p - params.eta).clamp(max=0.0), valid)


@register_shaping("delta", credit="sum")
def delta_rewards(p: Tensor, step_mask: Tensor, params: ShapingParams) -> Tensor:
    """`r_h = p_h - p_{h+1}` before each row's last step, `p_h` on it: [B, H] -> [B, H].

    The sum of a row's rewards from step h on is `p_h`."""
    p, valid = checked_steps(p, step_mask)
    nxt = torch.zeros_like(p)  # [B, H] p_{h+1} where step h+1 is valid, else 0
    nxt[:, :-1] = torch.where(valid[:, 1:], p[:, 1:], torch.zeros_like(p[:, 1:]))
    return _on_steps(p - nxt, valid)


@register_shaping("first_error", credit="pav")
def first_error_rewards(p: Tensor, step_mask: Tensor, params: ShapingParams) -> Tensor:
    """`-penalty` on each row's first step with `p_h < threshold`, else 0: [B, H] -> [B, H]."""
    p, valid = checked_steps(p, step_mask)
    below = (p < params.threshold) & valid  # [B, H]
    first = below & (below.long().cumsum(dim=1) == 1)  # [B, H] only the first one
    return torch.where(first, -params.penalty, 0.0).to(p.dtype)  # [B, H]


def shaping_fn(name: str) -> Shaping:
    """The shaping registered as `name`; one-line ConfigError naming it and the valid ones."""
    return PRM_SHAPINGS.get(name)


def shape_step_rewards(
    name: str, p: Tensor, step_mask: Tensor, params: ShapingParams | None = None
) -> Tensor:
    """Step rewards `[B, H]` of shaping `name` on step probabilities `p: [B, H]`."""
    return shaping_fn(name)(p, step_mask, params or ShapingParams())


def check_reduction(reduce: str) -> str:
    """`reduce` when it is one of AGREEMENT_REDUCTIONS; else a one-line ConfigError."""
    if reduce not in AGREEMENT_REDUCTIONS:
        raise ConfigError(
            f"unknown agreement reduction {reduce!r}; valid: {', '.join(AGREEMENT_REDUCTIONS)}"
        )
    return reduce


def response_scores(p: Tensor, step_mask: Tensor, reduce: str = "mean") -> tuple[Tensor, Tensor]:
    """(score [B], has_steps [B] bool): the mean (or min) of each row's valid step
    probabilities; rows without a step score 0 and have `has_steps` False."""
    check_reduction(reduce)
    p, valid = checked_steps(p, step_mask)
    counts = valid.sum(dim=1)  # [B]
    has = counts > 0
    if reduce == "mean":
        score = torch.where(valid, p, torch.zeros_like(p)).sum(dim=1) / counts.clamp(min=1)
    else:
        score = torch.where(valid, p, torch.full_like(p, float("inf"))).min(dim=1).values
    return torch.where(has, score, torch.zeros_like(score)), has  # [B] each


GATEABLE = ("first_error", "clip", "min")
"""Shapings whose step rewards are penalties (<= 0), which `gate_by_outcome` can confine to
wrong responses; `prob` and `delta` reward steps and are not gated."""


def gate_by_outcome(shaped: Tensor, outcome: Tensor) -> Tensor:
    """Step rewards kept only on wrong responses: shaped [B, H], outcome [B] in [0, 1] (right
    when >= 0.5) -> [B, H] with right responses' rows zeroed.

    The outcome verifier decides whether a response holds an error; the PRM only says where.
    A right response then cannot be penalised for a step the PRM misjudges, and a policy
    gains nothing from the PRM's approval of a wrong response beyond what the outcome gives."""
    if outcome.ndim != 1 or outcome.shape[0] != shaped.shape[0]:
        raise ValueError(f"expected outcome [B={shaped.shape[0]}], got {tuple(outcome.shape)}")
    wrong = (outcome.to(shaped.device) < 0.5).to(shaped.dtype)  # [B]
    return shaped * wrong.unsqueeze(1)


def penalise_unflagged(
    shaped: Tensor, p: Tensor, step_mask: Tensor, outcome: Tensor, penalty: float
) -> Tensor:
    """`first_error` rewards of wrong responses the PRM found no error in, made to carry the
    penalty anyway, at their lowest-p step: shaped, p, step_mask [B, H]; outcome [B] -> [B, H].

    With `gate_by_outcome` every wrong response then carries exactly one -penalty and every
    right one none, so the outcome alone sets each response's total reward and the PRM only
    says where the error is: a policy gains nothing by writing steps the PRM does not flag."""
    valid = step_mask > 0  # [B, H]
    wrong = outcome.to(shaped.device) < 0.5  # [B]
    unflagged = wrong & valid.any(dim=1) & ~(shaped < 0).any(dim=1)  # [B]
    lowest = p.masked_fill(~valid, float("inf")).argmin(dim=1)  # [B]
    out = shaped.clone()
    rows = unflagged.nonzero(as_tuple=True)[0]
    out[rows, lowest[rows]] = -penalty
    return out


def flag_counts(p: Tensor, step_mask: Tensor, outcome: Tensor, threshold: float) -> Tensor:
    """How often the PRM flags a step (p_h < threshold) in wrong and in right responses:
    p, step_mask [B, H], outcome [B] -> [4] float64 (wrong flagged, wrong, right flagged,
    right), over rows with at least one step (sums over ranks add up)."""
    valid = step_mask > 0
    has = valid.any(dim=1)  # [B]
    flagged = ((p < threshold) & valid).any(dim=1) & has  # [B]
    wrong = (outcome.to(p.device) < 0.5) & has
    right = ~(outcome.to(p.device) < 0.5) & has
    counts = [flagged & wrong, wrong, flagged & right, right]
    return torch.tensor([float(c.sum()) for c in counts], dtype=torch.float64)


def trust_weight(counts: Tensor) -> float:
    """The PRM's agreement with the outcome on a batch, from `flag_counts`: the share of wrong
    responses it flags minus the share of right ones it flags, floored at 0 (no wrong response:
    0). 1 for exact step labels; it falls as a policy learns errors the PRM does not flag, so
    step credit scaled by it fades to outcome-only instead of training on a PRM that has
    lost the policy's errors."""
    wrong_flagged, wrong, right_flagged, right = (float(c) for c in counts)
    if wrong == 0:
        return 0.0
    false_alarms = right_flagged / right if right else 0.0
    return max(0.0, wrong_flagged / wrong - false_alarms)


def agreement_keep(
    outcome: Tensor,
    p: Tensor,
    step_mask: Tensor,
    threshold: float = 0.5,
    reduce: str = "mean",
) -> Tensor:
    """PROF-style agreement filter: keep [B] bool.

    outcome: [B] in [0, 1] (right when >= 0.5), p / step_mask: [B, H]. A row is kept when its
    PRM score (`response_scores`) is >= `threshold` and it is right, or < `threshold` and it is
    wrong, or when it has no step (no PRM verdict)."""
    if outcome.ndim != 1 or outcome.shape[0] != p.shape[0]:
        raise ValueError(f"expected outcome [B={p.shape[0]}], got {tuple(outcome.shape)}")
    score, has = response_scores(p, step_mask, reduce)  # [B] each
    right = outcome.to(score.device) >= 0.5  # [B]
    prm_right = score >= threshold  # [B]
    return (right == prm_right) | ~has
