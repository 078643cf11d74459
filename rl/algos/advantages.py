"""Outcome-only advantage estimators: GRPO, Dr.GRPO, RLOO; plus shape helpers.

Every estimator is a pure function `fn(rewards: [P, K]) -> advantages [P, K]` over a batch of
P prompts with K sampled completions each (one scalar reward per completion), registered by
name in `ADVANTAGE_ESTIMATORS`. The trainer looks estimators up there; adding one is adding a
function.

Departures from / choices the papers leave open:
- **grpo** (Shao et al. 2024): `(r - mean) / (std + eps)` with the *unbiased* (K-1) standard
  deviation, as `torch.std` and TRL's `GRPOTrainer` compute it, and `eps = GRPO_EPS = 1e-4`
  (TRL's value). Needs K >= 2 (the unbiased std of one sample is undefined).
- **dr_grpo** (Liu et al. 2025): `r - mean`, no std division. Dr.GRPO's other change, the
  constant length normaliser, lives in the loss aggregation, not here: use
  `rl.algos.losses.aggregate_loss(mode="token_mean", global_tokens=global_seqs * max_new_tokens)`.
- **rloo** (Ahmadian et al. 2024): `r_i - mean_{j != i} r_j`, computed as
  `K / (K - 1) * (r_i - mean)`. Needs K >= 2.

Every estimator gives a group whose rewards are all equal *exactly* zero advantage: in
float32 the group mean of e.g. [0.3, 0.3, 0.3] is one ulp off 0.3, and divided by
`std + eps` that was 3e-4 to 6e-4 per token, so groups with no signal still pushed the
policy (`zero_flat_groups`).

Integer/bool rewards are promoted to float32; floating rewards keep their dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rl.core.errors import ConfigError
from rl.core.registry import Registry

AdvantageEstimator = Callable[[Tensor], Tensor]

ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")

GRPO_EPS = 1e-4
"""Added to the group std in `grpo` so that equal-reward groups give 0, not 0/0."""


def _check_groups(rewards: Tensor, name: str, min_k: int) -> Tensor:
    """Validate `rewards: [P, K]` and return it as a floating tensor."""
    if rewards.ndim != 2:
        raise ValueError(
            f"{name}: rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}"
        )
    k = rewards.shape[1]
    if k < min_k:
        raise ConfigError(
            f"advantage estimator {name!r} needs a group size (samples per prompt) of at least "
            f"{min_k}, got {k}"
        )
    return rewards if rewards.is_floating_point() else rewards.float()


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(rewards: Tensor) -> Tensor:
    """GRPO: `(r - mean_group) / (std_group + GRPO_EPS)`, unbiased std.

    rewards: [P, K] -> advantages: [P, K].
    """
    r = _check_groups(rewards, "grpo", min_k=2)
    mean = r.mean(dim=1, keepdim=True)  # [P, 1]
    std = r.std(dim=1, keepdim=True, unbiased=True)  # [P, 1]
    return zero_flat_groups((r - mean) / (std + GRPO_EPS), r)  # [P, K]


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo(rewards: Tensor) -> Tensor:
    """Dr.GRPO: `r - mean_group` (no std division).

    rewards: [P, K] -> advantages: [P, K].
    """
    r = _check_groups(rewards, "dr_grpo", min_k=1)
    return zero_flat_groups(r - r.mean(dim=1, keepdim=True), r)  # [P, K]


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(rewards: Tensor) -> Tensor:
    """RLOO: `r_i - (1/(K-1)) * sum_{j != i} r_j` (leave-one-out baseline).

    rewards: [P, K] -> advantages: [P, K]. Raises ConfigError when K < 2.
    """
    r = _check_groups(rewards, "rloo", min_k=2)
    return zero_flat_groups(r - leave_one_out_mean(r), r)  # [P, K]


def zero_flat_groups(advantages: Tensor, rewards: Tensor) -> Tensor:
    """`advantages` with every group whose rewards are all equal set to exactly 0.

    advantages, rewards: [P, K] -> [P, K]. A group holding a NaN is not flat (NaN != NaN), so
    a non-finite reward still shows in its advantages.
    """
    flat = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    return torch.where(flat, torch.zeros((), dtype=advantages.dtype), advantages)  # [P, K]


def leave_one_out_mean(grouped: Tensor) -> Tensor:
    """`mean_{j != i} x_j` within each group: [P, K] -> [P, K] (K >= 2)."""
    k = grouped.shape[1]
    return (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # [P, K]


def group_rewards(rewards: Tensor, group_size: int) -> Tensor:
    """Reshape flat rewards `[B]` (groups contiguous: prompt 0's K samples first) to `[B/K, K]`."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ConfigError(f"group_size must be >= 1, got {group_size}")
    b = rewards.shape[0]
    if b % group_size != 0:
        raise ValueError(
            f"batch of {b} rewards is not divisible by group_size={group_size}; each prompt "
            "needs exactly group_size samples, stored contiguously"
        )
    return rewards.view(b // group_size, group_size)  # [P, K]


def token_advantages(seq_adv: Tensor, mask: Tensor) -> Tensor:
    """Broadcast one advantage per sequence to each of its response tokens.

    seq_adv: [B], mask: [B, T] (1 on response tokens, 0 elsewhere; any dtype)
    -> [B, T] with `seq_adv[b]` where `mask[b, t]` is set and 0 elsewhere.
    """
    if seq_adv.ndim != 1 or mask.ndim != 2 or seq_adv.shape[0] != mask.shape[0]:
        raise ValueError(
            f"expected seq_adv [B] and mask [B, T], got {tuple(seq_adv.shape)} and "
            f"{tuple(mask.shape)}"
        )
    zero = torch.zeros((), dtype=seq_adv.dtype, device=seq_adv.device)
    return torch.where(mask.bool(), seq_adv.unsqueeze(1), zero)  # [B, 1] -> [B, T]
