"""PPO with a critic: GAE, Monte-Carlo returns, masked whitening, clipped value loss, token rewards.

Pure tensor maths (imports torch and pure `rl.*` modules only). Shapes: B sequences, T response
token positions (column 0 is the first response token); `mask: [B, T]` is 1 on response tokens
(any dtype, nonzero = counted). Responses are right-padded.

What is implemented (docs/algorithms.md, "PPO with a critic" and "Policy loss"):

- `gae`: `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = sum_l (gamma lam)^l delta_{t+l}`,
  `R_t = A_t + V_t`, one backward loop over T vectorised over B.
- The Monte-Carlo return-to-go is `rl.algos.credit.sum_form_returns` (GAE's returns with
  `lam = 1` and `V = 0` on right-padded masks).
- `whiten` / `masked_moments`: masked whitening with optional global (all-reduced) moments.
- `clipped_value_loss`: `max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) / 2` per token,
  aggregated by `rl.algos.losses.aggregate_loss` (sum form, like `rl.algos.losses.policy_loss`).
- `dense_token_rewards`: outcome reward on the last response token + process rewards already
  on step-end tokens `- kl_coef * kl` per token (classic RLHF KL-in-reward).

Conventions:

- **Terminal value 0**: the value after a response's last valid token is 0 (the episode ends
  there, whether by EOS or by truncation at max_new_tokens: truncation is treated as terminal,
  as TRL/verl do, not bootstrapped).
- **Padding**: positions with mask 0 get advantage 0 and return 0, and whatever `rewards` /
  `values` hold there (garbage, NaN) never reaches a valid position (selected with
  `torch.where`, not multiplied).
- **Masked positions inside a response** (e.g. tool-output tokens in a multi-turn rollout) are
  *skipped*: the recursion carries `V_{next}` and the running advantage across them, so the
  step after token t is the next *valid* token and `gamma` counts valid tokens. For
  right-padded masks (no holes) this is exactly the textbook recursion. Note that
  `sum_form_returns` instead keeps discounting across holes (gamma counts positions);
  the two agree on right-padded masks or with `gamma = 1`.
- `gae`, `whiten` and `dense_token_rewards` do not propagate gradients
  (inputs are detached); `clipped_value_loss` differentiates through `values` only.

Departures / choices:

- `whiten` uses the unbiased (Bessel, n-1) variance and `eps = WHITEN_EPS` inside the rsqrt, as
  TRL's `masked_whiten`; the moments are accumulated in float64 from `(sum, sum_sq, count)` so
  that ranks can all-reduce them. It needs at least 2 tokens in the (global) batch.
- `clipped_value_loss` with `clip = math.inf` is the unclipped `(V - R)^2 / 2`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rl.algos.losses import AggregationMode, aggregate_loss, masked_sum

WHITEN_EPS = 1e-8
"""Added to the variance inside the rsqrt in `whiten` (TRL's `masked_whiten` value)."""


def _check_bt(name: str, x: Tensor, mask: Tensor) -> None:
    if x.ndim != 2 or x.shape != mask.shape:
        raise ValueError(
            f"expected {name} and mask of one shape [B, T], got {tuple(x.shape)} and "
            f"{tuple(mask.shape)}"
        )


def _float_dtype(*xs: Tensor) -> torch.dtype:
    """The promoted dtype of `xs`, at least float32."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# GAE and returns
# --------------------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses.

    rewards: [B, T] token rewards r_t (e.g. from `dense_token_rewards`); values: [B, T] critic
    values V_t of the state before token t (from the rollout, i.e. the old critic);
    mask: [B, T]. Returns (advantages [B, T], returns [B, T]), detached, 0 where mask is 0:

        delta_t = r_t + gamma V_{t+1} - V_t       (V after the last valid token = 0)
        A_t     = delta_t + gamma lam A_{t+1}     = sum_l (gamma lam)^l delta_{t+l}
        R_t     = A_t + V_t                       (the critic's regression target)

    Masked positions are skipped (see the module docstring); their rewards and values are
    never read. dtype: that of rewards/values promoted, at least float32.
    """
    _check_bt("rewards", rewards, mask)
    _check_bt("values", values, mask)
    dtype = _float_dtype(rewards, values)
    r = rewards.detach().to(dtype)
    v = values.detach().to(dtype)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=r.device)
    adv = torch.zeros_like(r)  # [B, T]
    next_value = r.new_zeros(r.shape[0])  # [B] V of the next valid token; 0 = terminal
    running = r.new_zeros(r.shape[0])  # [B] A of the next valid token
    for t in range(r.shape[1] - 1, -1, -1):
        valid = m[:, t]  # [B]
        delta = r[:, t] + gamma * next_value - v[:, t]  # [B] garbage where not valid
        running = torch.where(valid, delta + gamma * lam * running, running)
        next_value = torch.where(valid, v[:, t], next_value)
        adv[:, t] = torch.where(valid, running, zero)
    returns = torch.where(m, adv + v, zero)  # [B, T]
    return adv, returns


# --------------------------------------------------------------------------------------------
# Whitening
# --------------------------------------------------------------------------------------------


def masked_moments(x: Tensor, mask: Tensor) -> tuple[float, float, float]:
    """(sum, sum of squares, count) of `x` over masked-in positions, accumulated in float64.

    x: [B, T], mask: [B, T] -> three Python floats (one device sync). All-reduce-SUM them over
    ranks (e.g. `torch.tensor([s, ss, n], dtype=torch.float64)`) and pass the result to
    `whiten(..., global_stats=...)`. Values at masked-out positions (even NaN) are ignored.
    """
    _check_bt("x", x, mask)
    m = mask.bool()
    x64 = torch.where(m, x.detach().double(), torch.zeros((), dtype=torch.float64, device=x.device))
    moments = torch.stack([x64.sum(), (x64 * x64).sum(), m.sum().double()])  # [3]
    s, ss, n = moments.tolist()
    return float(s), float(ss), float(n)


def whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    global_stats: tuple[float, float, float] | None = None,
) -> Tensor:
    """Masked whitening `(x - mean) / sqrt(var + WHITEN_EPS)` (+ mean back if not shift_mean).

    x: [B, T], mask: [B, T] -> [B, T] in x's dtype (at least float32), detached, 0 where mask
    is 0. mean and the unbiased variance come from `global_stats = (sum, sum_sq, count)` (the
    all-reduced `masked_moments` of the whole global batch, so the result does not depend on
    how the batch is split over ranks / micro-batches), or from this batch when None.
    `shift_mean=False` gives `(x - mean) / std + mean` (rescaled, mean kept: TRL's convention
    for rewards); `True` (default) is for advantages. Raises ValueError with fewer than 2 tokens.
    """
    _check_bt("x", x, mask)
    s, ss, n = masked_moments(x, mask) if global_stats is None else global_stats
    if n < 2:
        raise ValueError(
            f"whiten needs at least 2 masked-in tokens (unbiased variance), got count={n}"
        )
    mean = s / n
    var = max(ss / n - mean * mean, 0.0) * n / (n - 1)  # float64 maths on Python floats
    inv_std = 1.0 / math.sqrt(var + WHITEN_EPS)
    dtype = _float_dtype(x)
    xd = x.detach().to(dtype)
    out = (xd - mean) * inv_std  # [B, T]
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=dtype, device=x.device))


# --------------------------------------------------------------------------------------------
# Value loss
# --------------------------------------------------------------------------------------------


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float,
    mode: AggregationMode,
    global_tokens: float,
    global_seqs: float,
    *,
    stats_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum-form micro-batch PPO value loss, aggregated like `rl.algos.losses.policy_loss`.

    values: [b, T] V under the current critic (carries the gradient); old_values: [b, T] V at
    rollout time (the values `gae` used; a constant); returns: [b, T] the `gae` returns (a
    constant); mask: [b, T]; clip: c >= 0 (`math.inf` = no clipping). Per token:

        vf_t = max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) / 2

    aggregated by `aggregate_loss(vf, mask, mode, global_tokens, global_seqs)`. Multiply the
    loss (times the value coefficient) by `rl.algos.losses.engine_loss_scale` before backward.

    Returns (loss scalar, stats); stats are detached SUM-form contributions (all-reduce-SUM
    over every micro-batch of every rank), token means over `stats_tokens` (default
    `global_tokens`, as in `policy_loss`):
    - "vf_loss": the loss;
    - "vf_clip_frac": share of tokens where the clipped term is strictly larger, i.e. the
      token gets no value gradient (V is outside `V_old +- c` on the side away from R);
    - "vf_mse": mean of `(V - R)^2` (unclipped squared error);
    - "value_mean", "return_mean": means of V and R.

    Positions outside `mask` are set to 0 in all three inputs before any arithmetic, so padding
    garbage cannot produce inf/NaN values or gradients.
    """
    for name, x in (("values", values), ("old_values", old_values), ("returns", returns)):
        _check_bt(name, x, mask)
    if not clip >= 0:
        raise ValueError(f"value clip must be >= 0 (math.inf for none), got {clip}")
    m = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(m, values, zero)  # [b, T]
    v_old = torch.where(m, old_values.detach().to(values.dtype), zero)  # [b, T]
    ret = torch.where(m, returns.detach().to(values.dtype), zero)  # [b, T]
    v_clipped = torch.clamp(v, v_old - clip, v_old + clip) if math.isfinite(clip) else v
    unclipped_sq = (v - ret) ** 2  # [b, T]
    clipped_sq = (v_clipped - ret) ** 2  # [b, T]
    vf_tok = 0.5 * torch.maximum(unclipped_sq, clipped_sq)  # [b, T]
    loss = aggregate_loss(vf_tok, mask, mode, global_tokens, global_seqs)

    n_tok = global_tokens if stats_tokens is None else stats_tokens
    if n_tok <= 0:
        raise ValueError(f"stats_tokens must be positive, got {n_tok}")
    with torch.no_grad():
        was_clipped = (clipped_sq > unclipped_sq).to(vf_tok.dtype)  # [b, T]
        stats = {
            "vf_loss": loss.detach(),
            "vf_clip_frac": masked_sum(was_clipped, mask) / n_tok,
            "vf_mse": masked_sum(unclipped_sq.detach(), mask) / n_tok,
            "value_mean": masked_sum(v.detach(), mask) / n_tok,
            "return_mean": masked_sum(ret, mask) / n_tok,
        }
    return loss, stats


# --------------------------------------------------------------------------------------------
# Token rewards
# --------------------------------------------------------------------------------------------


def last_valid_index(mask: Tensor) -> Tensor:
    """Column of each row's last masked-in token: mask [B, T] -> [B] int64 (-1 for empty rows)."""
    if mask.ndim != 2:
        raise ValueError(f"expected mask [B, T], got {tuple(mask.shape)}")
    cols = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # [T] 1-based
    return (mask.bool().long() * cols).max(dim=1).values - 1  # [B]


def dense_token_rewards(
    outcome: Tensor,
    last_token_index: Tensor,
    step_rewards: Tensor | None,
    kl: Tensor | None,
    kl_coef: float,
    mask: Tensor,
) -> Tensor:
    """Token rewards for `gae`: outcome on the last token + process rewards - kl_coef * kl.

    outcome: [B] verifier rewards; last_token_index: [B] int, the column of each row's last
    response token (must be the row's last masked-in position: `last_valid_index(mask)`; rows
    with no masked-in token are ignored, and their outcome is dropped); step_rewards: [B, T]
    process rewards already placed on step-end tokens (0 elsewhere; e.g.
    `rl.algos.credit.steps_to_tokens`) or None; kl: [B, T] per-token KL estimate or None (then
    kl_coef must be 0); mask: [B, T].

        r_t = outcome * [t == last] + step_rewards_t - kl_coef * kl_t   (0 where mask is 0)

    For KL-in-reward pass the *rollout* policy's log-probs against the reference, e.g.
    `kl = old_logp - ref_logp` (k1: its sum over a response is an unbiased estimate of the
    sequence KL) or `rl.algos.losses.k3_kl(old_logp, ref_logp)`. Returns [B, T] detached, dtype at
    least float32; values at masked-out positions of step_rewards / kl are ignored.
    """
    if mask.ndim != 2 or outcome.shape != (mask.shape[0],):
        raise ValueError(
            f"expected outcome [B] and mask [B, T], got {tuple(outcome.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if last_token_index.shape != outcome.shape:
        raise ValueError(
            f"expected last_token_index [B={mask.shape[0]}], got {tuple(last_token_index.shape)}"
        )
    if step_rewards is not None:
        _check_bt("step_rewards", step_rewards, mask)
    if kl is not None:
        _check_bt("kl", kl, mask)
    elif kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs kl (per-token KL to the reference)")
    m = mask.bool()
    nonempty = m.any(dim=1)  # [B]
    last = last_token_index.to(device=mask.device, dtype=torch.long)
    expected = last_valid_index(mask)  # [B]
    bad = nonempty & (last != expected)
    if bad.any():
        b = int(bad.nonzero()[0, 0].item())
        raise ValueError(
            f"last_token_index[{b}] = {int(last[b].item())} is not row {b}'s last response "
            f"token (column {int(expected[b].item())} by mask)"
        )
    extra = [x for x in (step_rewards, kl) if x is not None]
    dtype = _float_dtype(outcome, *extra)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)  # [B, T]
    rows = torch.arange(mask.shape[0], device=mask.device)  # [B]
    col = expected.clamp(min=0)  # [B] empty rows write 0 to column 0 (masked out below)
    out[rows, col] = torch.where(nonempty, outcome.detach().to(dtype), zero)  # [B] -> [B, T]
    if step_rewards is not None:
        out = out + torch.where(m, step_rewards.detach().to(dtype), zero)
    if kl is not None and kl_coef != 0.0:
        out = out - kl_coef * torch.where(m, kl.detach().to(dtype), zero)
    return torch.where(m, out, zero)
