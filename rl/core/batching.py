"""How a step's rollouts split over ranks (`plan_batches`), splitting a batch into
consecutive chunks (micro-batches, forward-only passes), and a training pass's micro-batches
with the same count on every rank (`plan_micro_batches`). Imports no torch, so the dry-run
plan (`rl.engine.memory_plan`) uses the same arithmetic as the trainer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rl.core.errors import ConfigError


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Row indices `0..n-1` in consecutive chunks of at most `size`: n=5, size=2 ->
    [[0, 1], [2, 3], [4]]."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def plan_micro_batches(
    order: Sequence[int], world: int, rank: int, micro_batch_size: int
) -> list[tuple[list[int], list[bool]]]:
    """This rank's micro-batches over `order`: (indices, real) per step, the same number of
    steps and rows on every rank (ZeRO's collectives need it). The tail is padded with rows
    from the start of `order` marked `real=False` (they get weight 0)."""
    if not order:
        return []
    per_step = micro_batch_size * world
    steps = math.ceil(len(order) / per_step)
    padded = list(order) + [order[i % len(order)] for i in range(steps * per_step - len(order))]
    real = [i < len(order) for i in range(len(padded))]
    out = []
    for s in range(steps):
        lo = s * per_step + rank * micro_batch_size
        out.append((padded[lo : lo + micro_batch_size], real[lo : lo + micro_batch_size]))
    return out


@dataclass(frozen=True)
class BatchPlan:
    """How one step's rollouts are split on this rank."""

    local_prompts: int
    local_seqs: int
    mini_batch_seqs: int
    micro_batch_size: int
    grad_accum_steps: int


def plan_batches(
    prompts_per_step: int,
    group_size: int,
    mini_batches: int,
    micro_batch_size: int,
    world_size: int,
) -> BatchPlan:
    """Per-rank sizes of `rollout.prompts_per_step` prompts x `rollout.group_size` samples
    over `world_size` ranks, in `algo.mini_batches` mini-batches of `trainer.micro_batch_size`
    micro-batches; ConfigError naming the keys when the numbers do not divide."""
    if prompts_per_step % world_size:
        raise ConfigError(
            f"rollout.prompts_per_step={prompts_per_step} must be a multiple of the "
            f"{world_size} ranks"
        )
    local_seqs = prompts_per_step // world_size * group_size
    if local_seqs % mini_batches:
        raise ConfigError(
            f"algo.mini_batches={mini_batches} must divide the {local_seqs} "
            "sequences each rank generates per step"
        )
    mini = local_seqs // mini_batches
    micro = min(micro_batch_size, mini)
    if mini % micro:
        raise ConfigError(
            f"trainer.micro_batch_size={micro} must divide the {mini} sequences per rank "
            "in each mini-batch"
        )
    return BatchPlan(prompts_per_step // world_size, local_seqs, mini, micro, mini // micro)
