"""Per-step credit assignment for dense process rewards: step spans, PAV, PRIME, min-form, sum.

Pure tensor maths (imports torch and pure `rl.*` modules only). Conventions:

- Token tensors are `[B, T]` over *response* tokens (column 0 is the first response token,
  right padding), with a float 0/1 `mask`. Rows are grouped contiguously: rows
  `p*K .. p*K+K-1` are the K samples of prompt p (as in `rl.core.types.RolloutBatch`).
- A response is cut into steps `h = 0..H-1` (0-based here; 1-based in docs/algorithms.md).
  `step_id: [B, T]` (int64) is the step of each token, -1 off the response;
  `step_end: [B, T]` (float 0/1) is 1 on each step's last token. A step-level quantity lives
  either as `[B, H]` with a `step_mask: [B, H]` (valid steps first, padding after) or as a
  `[B, T]` tensor that is zero except on step-end tokens (`steps_to_tokens` /
  `tokens_to_steps` convert between the two).

What is implemented:

- **Step spans** (`step_spans_from_offsets`): steps of the response text -> token spans, from
  the character offsets of each response token. The rule for tokens that straddle a
  delimiter is documented on the function.
- **PAV** (Setlur et al. 2024): `pav_step_advantages[_batched]` turn the base policy's values
  `Q^pi` after each step into the Best-of-K prover's step advantages
  `A^mu_h = Q^mu(s_h) - Q^mu(s_{h-1})`, `Q^mu = 1 - (1 - Q^pi)^K`;
  `pav_token_advantages` gives every token of step h `outcome_adv + alpha * A^mu_h` (the
  step's own advantage, not a return-to-go), as docs/algorithms.md says.
- **PRIME** (Cui et al. 2025), `prime_advantages`: Eq. 5, a leave-one-out baseline per reward
  source, a discounted return-to-go of the baselined process rewards, plus the outcome RLOO
  advantage on every token. Eq. 5 subtracts the baseline *inside* the sum over positions s;
  with step rewards the positions that carry a reward are the step-end tokens, so the
  default (`baseline="per_step"`) subtracts `mean_{j!=i} r_phi(y^j)` on every step-end token
  of y^i. Pass `step_end=mask` to get PRIME's own token-level form. Options: `"last_token"`
  (subtract it once, on the last response token: the return from the first token is then
  the RLOO advantage of the sequence-level implicit reward) and `"per_token_mean"` (the
  public code: subtract on every response token the others' mean *per-token* implicit
  reward). Each source has a coefficient (`process_coef`, `outcome_coef`; the public code
  uses 5 for both; default 1 here). NOT implemented from the public code: the dense reward
  entering as `q` without `beta` divided by the batch's largest absolute return (scale
  `token_rewards` yourself; a batch-wide max would also make the result depend on how the
  batch is split across ranks).
- **Min-form** (PURE, Cheng et al. 2025), `min_form_step_rewards`: `w_h = softmax_h(-PR_h / T)`
  over the response's valid steps, step reward `w_h * PR_h`; the sum over steps tends to
  `min_h PR_h` as `T -> 0`. The weights are normalised over *all* steps of the response, so
  the return-to-go from a later step h is `sum_{h' >= h} w_h' PR_h'`, not `min_{h' >= h}`.
- **Sum-form** `sum_form_returns`: the plain discounted return-to-go of token rewards.
- `CREDIT_ASSIGNERS`: a registry with one uniform signature
  `fn(inputs: CreditInputs, **hyperparameters) -> advantages [B, T]`, so that a trainer picks
  a scheme by name (see `CreditInputs` for what each scheme reads from `step_scores`).

Discounting (`gamma`) counts token positions, as GAE does, not steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.algos.advantages import ADVANTAGE_ESTIMATORS, group_rewards, leave_one_out_mean
from rl.algos.credit_specs import (
    MinFormCredit,
    PAVCredit,
    PrimeBaseline,
    PrimeCredit,
    StepCreditSpec,
    SumCredit,
    register_spec,
)
from rl.core.errors import ConfigError
from rl.core.registry import Registry

Span = tuple[int, int]
PRIME_BASELINES: tuple[str, ...] = ("per_step", "last_token", "per_token_mean")


# --------------------------------------------------------------------------------------------
# Step spans
# --------------------------------------------------------------------------------------------


def _step_of_chars(text: str, delimiter: str, skip_blank: bool) -> list[int]:
    """Step index of every character of `text`, -1 on separator characters.

    Separator characters are those of each delimiter occurrence and, with `skip_blank`, those
    of segments that are empty or whitespace-only (such segments are not steps).
    """
    char_step = [-1] * len(text)
    pos, step = 0, 0
    for segment in text.split(delimiter):
        if segment and not (skip_blank and segment.isspace()):
            char_step[pos : pos + len(segment)] = [step] * len(segment)
            step += 1
        pos += len(segment) + len(delimiter)
    return char_step


def step_spans_from_offsets(
    text: str,
    offsets: Sequence[tuple[int, int]],
    delimiter: str = "\n",
    skip_blank: bool = True,
) -> list[Span]:
    """Token spans `[(start, end), ...]` (inclusive, one per step, in order) of a response.

    text: the response text; offsets: `(char_start, char_end)` of each response token in
    `text` (a fast tokenizer's `return_offsets_mapping=True` on `text` alone; offsets must be
    relative to `text`, not to prompt + response). Returns H spans that tile `0..len(offsets)-1`.

    Steps are the segments of `text.split(delimiter)`; empty segments (consecutive, leading or
    trailing delimiters) and, with `skip_blank`, whitespace-only segments are not steps: their
    characters count as separator characters, like the delimiter's. Token -> step rule:

    1. a token belongs to the step in which its first non-separator character lies
       (".\\n\\n" and ".\\nThe" belong to the step of "."; "\\nThe" to the step of "The");
    2. a token made only of separator characters, or with an empty offset span (special
       tokens such as EOS map to (0, 0) or (n, n)), belongs to the step of the token before
       it: the step it ends. Such tokens at the very start join the first step.
    3. a step that owns no token (possible only when one token runs from one step into the
       next and past its end, e.g. "a\\nb" followed by "\\n") is merged into the step that
       owns that token: it produces no span.

    A response with no delimiter, or with no step at all (empty or only separators), is one
    step. No tokens -> []. Raises ValueError on offsets outside `text` or that go backwards.
    """
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string")
    n = len(offsets)
    if n == 0:
        return []
    char_step = _step_of_chars(text, delimiter, skip_blank)
    token_step: list[int | None] = []
    for i, (start, end) in enumerate(offsets):
        if not 0 <= start <= end <= len(text):
            raise ValueError(
                f"token {i} has offsets ({start}, {end}) outside the response text of length "
                f"{len(text)}; offsets must be relative to the response text"
            )
        token_step.append(
            next((char_step[c] for c in range(start, end) if char_step[c] >= 0), None)
        )
    known = [s for s in token_step if s is not None]
    if not known:
        return [(0, n - 1)]
    # rule 2: separator-only / empty tokens take the previous token's step (leading: the first)
    filled: list[int] = []
    prev = known[0]
    for s in token_step:
        prev = prev if s is None else s
        filled.append(prev)
    spans: list[Span] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or filled[i] != filled[start]:
            if i < n and filled[i] < filled[start]:
                raise ValueError(
                    f"token offsets go backwards at token {i} (step {filled[i]} after step "
                    f"{filled[start]}); expected offsets in text order"
                )
            spans.append((start, i - 1))  # rule 3: steps with no token are simply absent
            start = i
    return spans


def step_end_mask(spans: Sequence[Span], length: int) -> Tensor:
    """1.0 on each span's last token: spans (inclusive) -> [T=length] float32."""
    out = torch.zeros(length)
    for start, end in spans:
        if not 0 <= start <= end < length:
            raise ValueError(f"span ({start}, {end}) does not fit in {length} tokens")
        out[end] = 1.0
    return out  # [T]


def step_ids_from_spans(spans: Sequence[Span], length: int) -> Tensor:
    """Step index of each token (-1 outside every span): spans -> [T=length] int64."""
    out = torch.full((length,), -1, dtype=torch.long)
    for h, (start, end) in enumerate(spans):
        if not 0 <= start <= end < length:
            raise ValueError(f"span ({start}, {end}) does not fit in {length} tokens")
        out[start : end + 1] = h
    return out  # [T]


def batch_step_tensors(spans: Sequence[Sequence[Span]], length: int) -> tuple[Tensor, Tensor]:
    """Per-row spans (B lists) -> (step_end [B, T] float32, step_id [B, T] int64, -1 off spans).

    `length` is T, the padded response length; spans index response tokens from column 0.
    """
    if not spans:
        return torch.zeros(0, length), torch.zeros(0, length, dtype=torch.long)
    ends = torch.stack([step_end_mask(s, length) for s in spans])  # [B, T]
    ids = torch.stack([step_ids_from_spans(s, length) for s in spans])  # [B, T]
    return ends, ids


def tokens_to_steps(token_values: Tensor, step_end: Tensor) -> tuple[Tensor, Tensor]:
    """Read a value at each step-end token into step-major form.

    token_values: [B, T], step_end: [B, T] (0/1) -> (values [B, H], step_mask [B, H] float),
    H = the most steps in any row; step h of row b is its (h+1)-th step-end token; padding 0.
    """
    ends = step_end.bool()
    counts = ends.sum(dim=1)  # [B]
    h = int(counts.max().item()) if counts.numel() else 0
    b = token_values.shape[0]
    values = token_values.new_zeros(b, h)
    step_mask = torch.arange(h, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)  # [B, H]
    values[step_mask] = token_values[ends]  # row-major order on both sides
    return values, step_mask.to(
        token_values.dtype if token_values.is_floating_point() else torch.float32
    )


def steps_to_tokens(step_values: Tensor, step_end: Tensor) -> Tensor:
    """Place step h's value on row b's (h+1)-th step-end token; zero elsewhere.

    step_values: [B, H] (H >= the steps in each row; extra columns are ignored),
    step_end: [B, T] (0/1) -> [B, T].
    """
    ends = step_end.bool()
    counts = ends.sum(dim=1)  # [B]
    if counts.numel() and int(counts.max().item()) > step_values.shape[1]:
        raise ValueError(
            f"a row has {int(counts.max().item())} steps but step_values has only "
            f"{step_values.shape[1]} columns"
        )
    out = step_values.new_zeros(step_end.shape)  # [B, T]
    keep = torch.arange(step_values.shape[1], device=counts.device).unsqueeze(0) < counts.unsqueeze(
        1
    )
    out[ends] = step_values[keep]  # [B, H] -> [B, T]
    return out


# --------------------------------------------------------------------------------------------
# PAV
# --------------------------------------------------------------------------------------------


def prover_values(q_pi: Tensor, prover_k: int) -> Tensor:
    """Best-of-K prover values `Q^mu = 1 - (1 - Q^pi)^K` (elementwise, any shape)."""
    if prover_k < 1:
        raise ConfigError(f"prover_k (K of the Best-of-K prover) must be >= 1, got {prover_k}")
    return 1.0 - (1.0 - q_pi) ** prover_k


def pav_step_advantages(q_pi: Tensor, prover_k: int) -> Tensor:
    """PAV step advantages under the Best-of-K prover for one response.

    q_pi: [H+1], `q_pi[0]` the value of the bare prompt, `q_pi[h]` Q^pi after step h (in
    [0, 1]) -> A^mu: [H] with `A^mu[h-1] = Q^mu[h] - Q^mu[h-1]`, `Q^mu = 1 - (1 - Q^pi)^K`.
    """
    if q_pi.ndim != 1:
        raise ValueError(f"q_pi must be 1-D [H+1], got shape {tuple(q_pi.shape)}")
    q_mu = prover_values(q_pi, prover_k)  # [H+1]
    return q_mu[1:] - q_mu[:-1]  # [H]


def pav_step_advantages_batched(q_pi: Tensor, step_mask: Tensor, prover_k: int) -> Tensor:
    """Batched `pav_step_advantages` over padded steps.

    q_pi: [B, H+1] (column 0 the prompt's value, column h the value after step h),
    step_mask: [B, H] (1 on valid steps, which must come first in each row)
    -> A^mu: [B, H], 0 on padded steps.
    """
    if q_pi.ndim != 2 or step_mask.shape != (q_pi.shape[0], q_pi.shape[1] - 1):
        raise ValueError(
            f"expected q_pi [B, H+1] and step_mask [B, H], got {tuple(q_pi.shape)} and "
            f"{tuple(step_mask.shape)}"
        )
    valid = step_mask.bool()
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("step_mask must mark each row's valid steps first (a prefix)")
    q_mu = prover_values(q_pi, prover_k)  # [B, H+1]
    adv = q_mu[:, 1:] - q_mu[:, :-1]  # [B, H]
    return torch.where(valid, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))


def pav_token_advantages(
    outcome_adv: Tensor, step_adv: Tensor, step_id: Tensor, alpha: float
) -> Tensor:
    """PAV effective advantage per token: `outcome_adv[b] + alpha * A^mu_h` on step h's tokens.

    outcome_adv: [B] (e.g. GRPO/RLOO of the outcome rewards), step_adv: [B, T] holding A^mu_h
    on step h's end token and 0 on the step's other tokens (as `steps_to_tokens` makes it; the
    step's value is the sum of `step_adv` over its tokens), step_id: [B, T] int (the step of
    each token, -1 off the response) -> [B, T], 0 where `step_id < 0`. Each step uses its own
    advantage, not a return-to-go over later steps.
    """
    if outcome_adv.ndim != 1 or step_adv.ndim != 2 or step_id.shape != step_adv.shape:
        raise ValueError(
            f"expected outcome_adv [B], step_adv [B, T], step_id [B, T]; got "
            f"{tuple(outcome_adv.shape)}, {tuple(step_adv.shape)}, {tuple(step_id.shape)}"
        )
    b, _ = step_adv.shape
    on = step_id >= 0  # [B, T]
    h = int(step_id.max().item()) + 1 if step_id.numel() else 0
    slot = torch.where(on, step_id.long(), torch.full_like(step_id.long(), h))  # -1 -> slot h
    per_step = step_adv.new_zeros(b, h + 1).scatter_add_(1, slot, step_adv)  # [B, H+1]
    adv = outcome_adv.unsqueeze(1) + alpha * per_step.gather(1, slot)  # [B, T]
    return torch.where(on, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))


# --------------------------------------------------------------------------------------------
# Returns, PRIME, min-form
# --------------------------------------------------------------------------------------------


def sum_form_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Return-to-go `R_t = sum_{s >= t} gamma^(s-t) r_s` over response tokens.

    token_rewards: [B, T] (e.g. step rewards on step-end tokens), mask: [B, T] -> [B, T],
    0 where `mask` is 0. Rewards under mask 0 are ignored; `gamma` counts token positions.
    """
    if token_rewards.shape != mask.shape or token_rewards.ndim != 2:
        raise ValueError(
            f"expected token_rewards and mask of one shape [B, T], got "
            f"{tuple(token_rewards.shape)} and {tuple(mask.shape)}"
        )
    m = mask.to(token_rewards.dtype) if token_rewards.is_floating_point() else mask.float()
    r = token_rewards * m  # [B, T]
    if gamma == 1.0:
        return r.flip(1).cumsum(1).flip(1) * m  # [B, T]
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # [B]
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * m


def _leave_one_out_mean(values: Tensor, group_size: int) -> Tensor:
    """`mean_{j != i} values[j]` within each contiguous group of K: [B] -> [B]."""
    if group_size < 2:
        raise ConfigError(
            f"leave-one-out baselines need a group size of at least 2, got {group_size}"
        )
    return leave_one_out_mean(group_rewards(values, group_size)).reshape(-1)  # [P, K] -> [B]


def prime_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    outcome: Tensor,
    group_size: int,
    gamma: float = 1.0,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    *,
    step_end: Tensor | None = None,
    baseline: PrimeBaseline = "per_step",
) -> Tensor:
    """PRIME advantages (paper Eq. 5): leave-one-out per source, return-to-go of the process part.

    token_rewards: [B, T] implicit-PRM rewards (`beta * sum of q` over each step, on the step's
    end token); mask: [B, T]; outcome: [B] verifier rewards r_o; rows grouped contiguously by
    `group_size` K >= 2; step_end: [B, T] 0/1, required for `baseline="per_step"`.

        r_phi(y^j) = sum_t token_rewards[j, t]                       (sequence implicit reward)
        b_i        = mean_{j != i} r_phi(y^j)                         (same group)
        d_i,s      = token_rewards[i, s] - b_i * place_i,s
        A_i,t      = process_coef * sum_{s >= t} gamma^(s-t) d_i,s
                     + outcome_coef * (r_o(y^i) - mean_{j != i} r_o(y^j))   (every token)

    `place` by `baseline`: "per_step" (default, Eq. 5 literally: 1 on every step-end token of
    y^i, so the first token's return is `r_phi(y^i) - H_i * b_i`; pass `step_end=mask` for
    PRIME's token-level rewards); "last_token" (1 on the last response token only, so the
    first token's return is `r_phi(y^i) - b_i`); "per_token_mean" (public code: b_i is
    `mean_{j != i} r_phi(y^j) / |y^j|` and is subtracted on every response token). Note that
    "per_step" makes the baseline term scale with the response's own step count, i.e. it acts
    as a reward of `-b_i` per step. -> [B, T], 0 off the response.
    """
    if baseline not in PRIME_BASELINES:
        raise ConfigError(f"prime baseline must be one of {PRIME_BASELINES}, got {baseline!r}")
    if token_rewards.ndim != 2 or mask.shape != token_rewards.shape:
        raise ValueError(
            f"expected token_rewards and mask [B, T], got {tuple(token_rewards.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if outcome.shape != (token_rewards.shape[0],):
        raise ValueError(
            f"expected outcome [B={token_rewards.shape[0]}], got {tuple(outcome.shape)}"
        )
    r = token_rewards if token_rewards.is_floating_point() else token_rewards.float()
    m = mask.to(r.dtype)  # [B, T]
    r = r * m
    seq = r.sum(dim=1)  # [B] r_phi(y^i)
    if baseline == "per_step":
        if step_end is None or step_end.shape != r.shape:
            raise ValueError(
                "prime baseline 'per_step' needs step_end [B, T] (use mask for tokens)"
            )
        place = step_end.to(r.dtype) * m  # [B, T]
        b = _leave_one_out_mean(seq, group_size)  # [B]
    elif baseline == "last_token":
        lengths = m.sum(dim=1).long()  # [B]
        last = (m * torch.arange(1, r.shape[1] + 1, device=r.device, dtype=r.dtype)).argmax(dim=1)
        place = torch.zeros_like(r)
        place[torch.arange(r.shape[0], device=r.device), last] = (lengths > 0).to(r.dtype)
        b = _leave_one_out_mean(seq, group_size)
    else:  # per_token_mean
        per_token = seq / m.sum(dim=1).clamp(min=1.0)  # [B]
        place = m
        b = _leave_one_out_mean(per_token, group_size)
    process = sum_form_returns(r - b.unsqueeze(1) * place, m, gamma)  # [B, T]
    o = outcome.to(r.dtype)
    outcome_adv = o - _leave_one_out_mean(o, group_size)  # [B] RLOO
    return process_coef * process + outcome_coef * outcome_adv.unsqueeze(1) * m


def min_form_step_rewards(
    step_rewards: Tensor, step_mask: Tensor, temperature: float = 0.1
) -> Tensor:
    """PURE min-form step rewards `w_h * PR_h`, `w_h = softmax_h(-PR_h / T)` over valid steps.

    step_rewards: [B, H] process rewards PR_h, step_mask: [B, H] -> [B, H], 0 on padded steps
    (and on rows with no valid step). `sum_h w_h PR_h -> min_h PR_h` as `T -> 0`.
    """
    if temperature <= 0:
        raise ConfigError(f"min-form temperature must be positive, got {temperature}")
    if step_rewards.shape != step_mask.shape or step_rewards.ndim != 2:
        raise ValueError(
            f"expected step_rewards and step_mask [B, H], got {tuple(step_rewards.shape)} and "
            f"{tuple(step_mask.shape)}"
        )
    pr = step_rewards if step_rewards.is_floating_point() else step_rewards.float()
    valid = step_mask.bool()
    logits = (-pr / temperature).masked_fill(~valid, float("-inf"))  # [B, H]
    logits = torch.where(valid.any(dim=1, keepdim=True), logits, torch.zeros_like(logits))
    w = logits.softmax(dim=1) * valid  # [B, H]
    return w * pr.masked_fill(~valid, 0.0)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass
class CreditInputs:
    """Everything a credit-assignment scheme reads; `CREDIT_ASSIGNERS` functions take this.

    B rows grouped contiguously by `group_size`, T response tokens, H the most steps in a row.
    """

    mask: Tensor
    """[B, T] float 0/1 on response tokens."""
    step_id: Tensor
    """[B, T] int64, each token's step (0-based), -1 off the response."""
    step_end: Tensor
    """[B, T] float 0/1 on each step's last token; row b has `step_mask[b].sum()` of them."""
    outcome: Tensor
    """[B] outcome (verifier) rewards r_o."""
    group_size: int
    """K, samples per prompt."""
    step_scores: Tensor
    """[B, H] one number per step, valid steps first: the (weighted) reward heads' step
    rewards. "pav": the prover's step advantage A^mu_h; "prime": implicit-PRM step reward
    (beta * sum of q over the step); "sum" / "min_form": the PRM's step reward PR_h."""
    step_mask: Tensor
    """[B, H] float 0/1 on valid steps (a prefix of each row)."""
    gamma: float = 1.0
    """Discount over token positions for return-to-go schemes (the run's `algo.gamma`)."""
    outcome_estimator: str = "rloo"
    """Advantage estimator of the outcome term where a scheme lets it be chosen ("pav")."""


CreditAssigner = Callable[..., Tensor]
"""`fn(inputs: CreditInputs, **options) -> advantages [B, T]` (0 off the response)."""

CREDIT_ASSIGNERS: Registry[CreditAssigner] = Registry("credit assigner")


def register_credit(spec: type[StepCreditSpec]) -> Callable[[CreditAssigner], CreditAssigner]:
    """Register a step-credit function under its spec's `name`; the spec (a
    `StepCreditSpec` subclass holding the function's keyword options) becomes a valid
    `algo.credit`."""

    def add(fn: CreditAssigner) -> CreditAssigner:
        register_spec(spec)
        CREDIT_ASSIGNERS.register(spec.name)(fn)
        return fn

    return add


@register_credit(PAVCredit)
def pav_credit(inputs: CreditInputs, alpha: float = 0.5) -> Tensor:
    """PAV: `outcome_estimator(r_o)` on every token + `alpha * A^mu_h` on step h's tokens.

    `step_scores` are the prover's step advantages A^mu_h (the PAV head computes them from
    its Q^pi values with `pav_step_advantages_batched`)."""
    est = ADVANTAGE_ESTIMATORS.get(inputs.outcome_estimator)
    outcome = inputs.outcome if inputs.outcome.is_floating_point() else inputs.outcome.float()
    outcome_adv = est(group_rewards(outcome, inputs.group_size)).reshape(-1)  # [P, K] -> [B]
    step_adv = inputs.step_scores * inputs.step_mask  # [B, H]
    token_step_adv = steps_to_tokens(step_adv, inputs.step_end)  # [B, T]
    adv = pav_token_advantages(outcome_adv, token_step_adv, inputs.step_id, alpha)
    return adv * inputs.mask.to(adv.dtype)


@register_credit(PrimeCredit)
def prime_credit(
    inputs: CreditInputs,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    baseline: PrimeBaseline = "per_step",
) -> Tensor:
    """PRIME Eq. 5 on the implicit-PRM step rewards (see `prime_advantages`)."""
    return _loo_returns(inputs, inputs.step_scores, process_coef, outcome_coef, baseline)


def _loo_returns(
    inputs: CreditInputs,
    step_rewards: Tensor,
    process_coef: float,
    outcome_coef: float,
    baseline: PrimeBaseline = "last_token",
) -> Tensor:
    """Return-to-go of `step_rewards` [B, H] placed on step ends, minus the others' mean
    total placed by `baseline` (default once, on the last token), plus the outcome RLOO on
    every token: `prime_advantages` on step rewards."""
    rewards = steps_to_tokens(step_rewards, inputs.step_end)  # [B, T]
    return prime_advantages(
        rewards,
        inputs.mask,
        inputs.outcome,
        inputs.group_size,
        inputs.gamma,
        process_coef,
        outcome_coef,
        step_end=inputs.step_end,
        baseline=baseline,
    )


@register_credit(SumCredit)
def sum_credit(
    inputs: CreditInputs, process_coef: float = 1.0, outcome_coef: float = 1.0
) -> Tensor:
    """Sum-form: return-to-go of PR_h, minus the others' mean total (once, on the last token),
    plus the outcome RLOO on every token (= `prime_advantages(..., baseline="last_token")`)."""
    step_rewards = inputs.step_scores * inputs.step_mask  # [B, H]
    return _loo_returns(inputs, step_rewards, process_coef, outcome_coef)


@register_credit(MinFormCredit)
def min_form_credit(
    inputs: CreditInputs,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    temperature: float = 0.1,
) -> Tensor:
    """Min-form: like "sum" but on the PURE-weighted step rewards `w_h * PR_h`."""
    weighted = min_form_step_rewards(inputs.step_scores, inputs.step_mask, temperature)  # [B, H]
    return _loo_returns(inputs, weighted, process_coef, outcome_coef)
