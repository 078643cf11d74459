"""Implicit PRM maths (Yuan et al. 2024) as used online by PRIME (Cui et al. 2025).

Pure tensor maths (imports torch and pure `rl.*` modules only). Shapes follow `rl.algos.credit`:
token tensors are `[B, T]` over *response* tokens (right padding) with a float 0/1 `mask`;
`step_id: [B, T]` (int64) is each token's step (0-based), -1 off the response; step-level
quantities are `[B, H]` with a `step_mask: [B, H]`.

- `implicit_token_rewards`: `r_t = beta * (log pi_phi(y_t) - log pi_ref(y_t))`.
- `implicit_step_rewards`: `sum_{t in step h} r_t` -> `[B, H]` (place them on step-end tokens
  with `rl.algos.credit.steps_to_tokens` for `rl.algos.credit.prime_advantages`).
- `sequence_reward`: `r_phi(y) = sum_t r_t`.
- `implicit_prm_ce_loss`: the outcome cross-entropy
  `-[r_o log sigma(r_phi) + (1 - r_o) log(1 - sigma(r_phi))]` in sum form (divided by the
  global sequence count), so micro-batches on all ranks sum to the global-batch mean, like
  `rl.algos.losses.aggregate_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rl.core.errors import ConfigError


def _check_same_shape(names: str, *tensors: Tensor) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if len(shapes[0]) != 2 or any(s != shapes[0] for s in shapes):
        raise ValueError(f"expected {names} all [B, T], got {', '.join(map(str, shapes))}")


def implicit_token_rewards(
    prm_logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float = 0.05
) -> Tensor:
    """Implicit-PRM token rewards `beta * (log pi_phi(y_t) - log pi_ref(y_t))`, 0 off-mask.

    prm_logp: [B, T] (log-probs of the sampled tokens under the PRM; carries the gradient when
    training it), ref_logp: [B, T] (under the frozen reference; a constant), mask: [B, T]
    (nonzero = response token) -> [B, T]. NaN/inf at masked-out positions are ignored.
    """
    if beta <= 0:
        raise ConfigError(f"implicit PRM beta must be positive, got {beta}")
    _check_same_shape("prm_logp, ref_logp and mask", prm_logp, ref_logp, mask)
    r = beta * (prm_logp - ref_logp.detach())  # [B, T]
    return torch.where(mask.bool(), r, torch.zeros((), dtype=r.dtype, device=r.device))


def implicit_step_rewards(
    token_rewards: Tensor, step_id: Tensor, n_steps: int | None = None
) -> tuple[Tensor, Tensor]:
    """Sum the token rewards of each step.

    token_rewards: [B, T] (0 off the response), step_id: [B, T] int (0-based step of each
    token, -1 off the response; tokens with -1 are ignored) -> (step_rewards [B, H],
    step_mask [B, H] float 0/1 on steps that own at least one token). H = `n_steps` if given
    (it must cover every step id), else the largest step id + 1 (0 if there is none).
    Step ids are expected to be 0..H_b-1 in each row (as `rl.algos.credit.batch_step_tensors`
    makes them), so valid steps come first.
    """
    if token_rewards.shape != step_id.shape or token_rewards.ndim != 2:
        raise ValueError(
            f"expected token_rewards and step_id [B, T], got {tuple(token_rewards.shape)} and "
            f"{tuple(step_id.shape)}"
        )
    ids = step_id.long()
    top = int(ids.max().item()) + 1 if ids.numel() else 0
    h = top if n_steps is None else n_steps
    if h < top:
        raise ValueError(f"n_steps={n_steps} but step_id holds step {top - 1}")
    valid = ids >= 0  # [B, T]
    index = torch.where(valid, ids, torch.full_like(ids, h))  # off-response -> spare column h
    vals = torch.where(valid, token_rewards, torch.zeros_like(token_rewards))  # [B, T]
    b = token_rewards.shape[0]
    sums = vals.new_zeros(b, h + 1).scatter_add(1, index, vals)  # [B, H+1]
    counts = torch.zeros(b, h + 1, device=ids.device).scatter_add(1, index, valid.float())
    dtype = token_rewards.dtype if token_rewards.is_floating_point() else torch.float32
    return sums[:, :h], (counts[:, :h] > 0).to(dtype)


def sequence_reward(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """`r_phi(y) = sum_t r_t` over masked-in tokens: [B, T], [B, T] -> [B]."""
    _check_same_shape("token_rewards and mask", token_rewards, mask)
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    return torch.where(mask.bool(), token_rewards, zero).sum(dim=1)  # [B]


def implicit_prm_ce_loss(
    token_rewards: Tensor,
    mask: Tensor,
    outcome: Tensor,
    global_seqs: float,
    check_labels: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the global-batch mean outcome cross-entropy (sum form).

    token_rewards: [b, T] (from `implicit_token_rewards`, carrying the PRM's gradient),
    mask: [b, T], outcome: [b] verifier rewards r_o in [0, 1] (soft labels allowed),
    global_seqs: number of sequences in the whole global batch (all micro-batches, all ranks).
    Loss `sum_i -[r_o log sigma(r_phi) + (1 - r_o) log sigma(-r_phi)] / global_seqs` (scalar;
    `log(1 - sigma(x)) = log sigma(-x)`, both via logsigmoid for stability).
    Stats (detached scalars, both in sum form, so they too add up over micro-batches/ranks to
    the global value): "prm/ce_loss" the loss; "prm/acc" (number of rows where
    `r_phi > 0` agrees with `r_o > 0.5`) / global_seqs. `check_labels=False` skips the
    [0, 1] check of the labels (a host read) for a caller that checked them once already.
    """
    if global_seqs <= 0:
        raise ValueError(f"global_seqs must be positive, got {global_seqs}")
    _check_same_shape("token_rewards and mask", token_rewards, mask)
    if outcome.shape != token_rewards.shape[:1]:
        raise ValueError(
            f"expected outcome [B] = [{token_rewards.shape[0]}], got {list(outcome.shape)}"
        )
    r_o = outcome.detach().to(token_rewards.dtype)  # [b]
    if check_labels and ((r_o < 0) | (r_o > 1)).any():
        raise ValueError("implicit PRM outcome labels must lie in [0, 1]")
    r_phi = sequence_reward(token_rewards, mask)  # [b]
    ce = -(r_o * F.logsigmoid(r_phi) + (1.0 - r_o) * F.logsigmoid(-r_phi))  # [b]
    loss = ce.sum() / global_seqs
    correct = ((r_phi.detach() > 0) == (r_o > 0.5)).to(r_phi.dtype)  # [b]
    stats = {"prm/ce_loss": loss.detach(), "prm/acc": correct.sum() / global_seqs}
    return loss, stats
