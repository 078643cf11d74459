"""Outcome reward functions: registry, resolution, and validated, weighted scoring.

A reward function has TRL's signature:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where `columns` are the dataset's columns as lists aligned with the completions (e.g.
`answer=[...]`). It must return one finite number per completion. `None` ("not applicable"
in TRL) is *not* accepted here: return 0.0 (or another neutral value) instead, so that every
completion has a well-defined, finite reward.

A function that raises or outlives `CallPolicy.timeout_s` is reported with its name and the
row (found by calling it again one row at a time after an exception; a timeout names the
call's rows, as retrying a hung function would only hang again), and `CallPolicy.on_error`
decides: `raise` stops the run, `zero` gives the failed rows 0 and counts them. Bad return
values (None, NaN, a wrong length) always stop the run: they are bugs, not outages.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rl.core.deadline import CallTimeout, call_with_timeout
from rl.core.errors import RewardCallError, RewardError, one_line
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


@dataclass(frozen=True)
class CallPolicy:
    """How reward code that raises or hangs is handled (`reward.timeout_s`, `reward.on_error`)."""

    timeout_s: float | None = None
    """Longest one call may take, seconds (None: no limit)."""
    on_error: Literal["raise", "zero"] = "raise"
    """`raise`: a one-line RewardCallError; `zero`: the failed rows score 0, counted."""
    where: str = ""
    """Where the call happens, for messages (e.g. `step 3, rank 1`)."""


_WARNED: set[str] = set()
"""Functions and heads whose first failure under `on_error=zero` was already printed."""


def warn_once(name: str, message: str) -> None:
    """Print `message` the first time `name` fails in this process; later failures are only
    counted in `reward/errors`."""
    if name not in _WARNED:
        _WARNED.add(name)
        print(
            f"warning: {message}; scored 0 (reward.on_error=zero; later errors of {name!r} "
            "are counted in reward/errors)",
            file=sys.stderr,
            flush=True,
        )


def score_outcomes(
    specs_and_fns: Sequence[tuple[RewardSpec, RewardFn]],
    prompts: list[str],
    completions: list[str],
    columns: Mapping[str, list[Any]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`score_outcomes_guarded` with no timeout, raising on any failure."""
    total, per_fn, _ = score_outcomes_guarded(specs_and_fns, prompts, completions, columns)
    return total, per_fn


def score_outcomes_guarded(
    specs_and_fns: Sequence[tuple[RewardSpec, RewardFn]],
    prompts: list[str],
    completions: list[str],
    columns: Mapping[str, list[Any]],
    policy: CallPolicy = CallPolicy(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Call every reward function on the N completions and combine them.

    prompts, completions: [N]; columns: {name: [N]}. Returns (weighted total `[N]` float32,
    {spec.fn: rewards `[N]` float32}, rows zeroed by `policy.on_error=zero`). A function
    listed twice gets keys `fn`, `fn#2`, ... Any failure or bad return value is a one-line
    RewardError naming the function (and the row, for a raise or timeout).
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
    errors = 0
    for spec, fn in specs_and_fns:
        values, failed = _call(spec.fn, fn, prompts, completions, kwargs, policy)
        errors += failed
        rewards = torch.tensor(values, dtype=torch.float64)
        total += spec.weight * rewards
        per_fn[_unique_key(per_fn, spec.fn)] = rewards.float()
    return total.float(), per_fn, errors


def _call(
    name: str,
    fn: RewardFn,
    prompts: list[str],
    completions: list[str],
    kwargs: Mapping[str, list[Any]],
    policy: CallPolicy,
) -> tuple[list[float], int]:
    """The function's N values and how many rows were zeroed for a failure."""
    n = len(completions)
    at = f" ({policy.where})" if policy.where else ""
    try:
        out = call_with_timeout(fn, policy.timeout_s, list(prompts), list(completions), **kwargs)
    except CallTimeout:
        message = (
            f"reward function {name!r} timed out after {policy.timeout_s:g} s (reward.timeout_s) "
            f"on rows 0-{n - 1}{at}, first prompt {_short(prompts[0] if n else '')}"
        )
        if policy.on_error == "raise":
            raise RewardCallError(message) from None
        warn_once(name, message)
        return [0.0] * n, n
    except Exception as e:
        return _rows_after_error(name, fn, prompts, completions, kwargs, policy, e)
    return _validate(name, out, n), 0


def _rows_after_error(
    name: str,
    fn: RewardFn,
    prompts: list[str],
    completions: list[str],
    kwargs: Mapping[str, list[Any]],
    policy: CallPolicy,
    error: Exception,
) -> tuple[list[float], int]:
    """After the batched call raised: call `fn` one row at a time to find the failing rows.
    `raise`: a RewardCallError naming the first; `zero`: they score 0, the others keep their
    values. A row that times out ends the search (the rest count as failed)."""
    at = f" ({policy.where})" if policy.where else ""
    values: list[float] = []
    failed: list[int] = []
    first: tuple[int, str] | None = None
    for i in range(len(completions)):
        row_kwargs = {k: [v[i]] for k, v in kwargs.items()}
        try:
            out = call_with_timeout(
                fn, policy.timeout_s, [prompts[i]], [completions[i]], **row_kwargs
            )
            values += _validate(name, out, 1)
            continue
        except CallTimeout:
            cause = f"timed out after {policy.timeout_s:g} s (reward.timeout_s)"
            rest = range(i, len(completions))
        except RewardError:
            raise
        except Exception as e:
            cause, rest = f"raised {one_line(e)}", range(i, i + 1)
        first = first or (i, cause)
        failed += list(rest)
        values += [0.0] * len(rest)
        if len(rest) > 1 or policy.on_error == "raise":
            break
    if first is None:  # every row alone is fine: the batch as a whole failed
        first = (0, f"raised {one_line(error)} on the batch (each row alone scores)")
        failed, values = list(range(len(completions))), [0.0] * len(completions)
    row, cause = first
    message = f"reward function {name!r} {cause} on row {row}{at}, prompt {_short(prompts[row])}"
    if policy.on_error == "raise":
        raise RewardCallError(message) from error
    warn_once(name, message)
    return values, len(failed)


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
