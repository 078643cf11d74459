"""Outcome reward functions: registry, resolution, and validated, weighted scoring.

A reward function has TRL's signature:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where `columns` are the dataset's columns as lists aligned with the completions (e.g.
`answer=[...]`). It must return one finite number per completion. `None` ("not applicable"
in TRL) is *not* accepted here: return 0.0 (or another neutral value) instead, so that every
completion has a well-defined, finite reward.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rl.core.errors import RewardError, one_line
from rl.core.registry import Registry

RewardFn = Callable[..., Sequence[float]]

REWARD_FUNCTIONS: Registry[RewardFn] = Registry("reward function")

# Keyword names the call itself uses; dataset columns with these names are not passed on.
_RESERVED = ("prompts", "completions")


@dataclass
class RewardSpec:
    """One configured reward: a registered name or `package.module:function`, its weight in the
    total, and extra keyword arguments bound with `functools.partial`."""

    fn: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


def score_outcomes(
    specs_and_fns: Sequence[tuple[RewardSpec, RewardFn]],
    prompts: list[str],
    completions: list[str],
    columns: Mapping[str, list[Any]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Call every reward function on the N completions and combine them.

    prompts, completions: [N]; columns: {name: [N]}. Returns (weighted total `[N]` float32,
    {spec.fn: rewards `[N]` float32}). A function listed twice gets keys `fn`, `fn#2`, ...
    Any failure or bad return value is a one-line RewardError naming the function.
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    kwargs = {k: v for k, v in columns.items() if k not in _RESERVED}
    for k, v in kwargs.items():
        if len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} values for {n} completions")
    total = torch.zeros(n, dtype=torch.float64)
    per_fn: dict[str, torch.Tensor] = {}
    for spec, fn in specs_and_fns:
        values = _call(spec.fn, fn, prompts, completions, kwargs)
        rewards = torch.tensor(values, dtype=torch.float64)
        total += spec.weight * rewards
        per_fn[_unique_key(per_fn, spec.fn)] = rewards.float()
    return total.float(), per_fn


def _call(
    name: str,
    fn: RewardFn,
    prompts: list[str],
    completions: list[str],
    kwargs: Mapping[str, list[Any]],
) -> list[float]:
    try:
        out = fn(list(prompts), list(completions), **kwargs)
    except Exception as e:
        raise RewardError(f"reward function {name!r} raised {one_line(e)}") from e
    return _validate(name, out, len(completions))


def _validate(name: str, out: Any, n: int) -> list[float]:
    """The function's output as N finite floats, or a RewardError naming the first bad index."""
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().tolist() if out.dim() == 1 else out
    elif hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:  # numpy array
        out = out.tolist()
    if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, Sequence):
        raise RewardError(
            f"reward function {name!r} returned {type(out).__name__}, expected a list of {n} floats"
        )
    if len(out) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(out)} values for {n} completions"
        )
    values: list[float] = []
    for i, v in enumerate(out):
        if v is None:
            raise RewardError(
                f"reward function {name!r} returned None at index {i} "
                "(None rewards are not supported; return 0.0 instead)"
            )
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward function {name!r} returned a non-number at index {i}: "
                f"{type(v).__name__} {_short(v)}"
            )
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"reward function {name!r} returned {f} at index {i}")
        values.append(f)
    return values


def _unique_key(existing: Mapping[str, Any], name: str) -> str:
    key, k = name, 1
    while key in existing:
        k += 1
        key = f"{name}#{k}"
    return key


def _short(v: Any, limit: int = 40) -> str:
    s = repr(v).replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def checked_verifier_scores(name: str, scores: torch.Tensor) -> torch.Tensor:
    """The verifier's scores `[N]` as float32, or a RewardError naming the function and the
    first rows outside [0, 1] (online heads learn from them as labels, PAV as successes)."""
    bad = ((scores < 0) | (scores > 1)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(
            f"reward function {name!r} is the verifier (the first in reward.functions) and "
            f"must score in [0, 1]; rows {bad[:8]} are outside (e.g. {float(scores[bad[0]])})"
        )
    return scores.float()
