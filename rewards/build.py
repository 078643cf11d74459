"""Resolving the configured rewards: reward functions and reward heads by registered name or
`package.module:attr`, and the verifier that online heads and the PAV pipeline call.

This module sits above the registries (`rewards.base`, `rewards.heads`) and the built-in
plug-ins that fill them (`rewards.verifiers`, `rewards.implicit_prm_head`, `rewards.pav`),
so that none of those needs to import another to register itself.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor

from rewards.base import (
    REWARD_FUNCTIONS,
    RewardFn,
    RewardSpec,
    checked_verifier_scores,
    score_outcomes,
)
from rewards.heads import GRANULARITIES, REWARD_HEADS, RewardHead, head_options
from rl.core.errors import ConfigError, RewardError, one_line
from rl.core.registry import Registry, import_object

T = TypeVar("T")

BUILTIN_FUNCTION_MODULES = ("rewards.verifiers",)
"""Modules that register the built-in reward functions (arith, exact_match, math_verify)."""

BUILTIN_HEAD_MODULES = (
    "rewards.implicit_prm_head",
    "rewards.pav",
    "rewards.gold_steps",
    "rewards.prm_head",
)
"""Modules that register the built-in heads; imported on first resolution (they pull in
transformers and DeepSpeed)."""

Verifier = Callable[[list[str], list[str], dict[str, list[Any]]], Tensor]
"""`fn(prompts [N], completions [N], columns {name: [N]}) -> outcome [N]` in [0, 1]."""


def _registered(registry: Registry[T], spec: str, modules: Sequence[str], form: str) -> T:
    """`registry[spec]` after importing the modules that fill it; an unknown name is a
    ConfigError that points to `form` when the spec looks like an import path."""
    for module in modules:
        importlib.import_module(module)
    try:
        return registry.get(spec)
    except ConfigError as e:
        hint = f"; for your own {registry.kind} use {form!r}" if "." in spec else ""
        raise ConfigError(f"{e}{hint}") from None


def resolve_reward_fn(spec: str) -> RewardFn:
    """The function for a registered name (e.g. "math_verify") or a `package.module:function`."""
    if ":" not in spec:
        return _registered(
            REWARD_FUNCTIONS, spec, BUILTIN_FUNCTION_MODULES, "package.module:function"
        )
    obj = import_object(spec, "reward function", "package.module:function", RewardError)
    if not callable(obj):
        raise RewardError(f"reward function {spec!r} is not callable ({type(obj).__name__})")
    fn: RewardFn = obj
    return fn


def build_reward_fns(specs: Sequence[RewardSpec]) -> list[tuple[RewardSpec, RewardFn]]:
    """Resolve each spec and bind its kwargs: the input `score_outcomes` expects."""
    out: list[tuple[RewardSpec, RewardFn]] = []
    for spec in specs:
        fn = resolve_reward_fn(spec.fn)
        out.append((spec, functools.partial(fn, **spec.kwargs) if spec.kwargs else fn))
    return out


def make_verifier(spec: RewardSpec) -> Verifier:
    """The outcome verifier (`spec`'s weight ignored): its scores, checked to lie in [0, 1]."""
    fns = build_reward_fns([RewardSpec(spec.fn, 1.0, dict(spec.kwargs))])

    def verify(prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> Tensor:
        _, per_fn = score_outcomes(fns, prompts, completions, columns)
        return checked_verifier_scores(spec.fn, next(iter(per_fn.values())))  # [N]

    return verify


def head_class(spec: str) -> type[RewardHead]:
    """The head class named by `spec` (a registered name or `package.module:ClassName`)."""
    if ":" not in spec:
        return _registered(REWARD_HEADS, spec, BUILTIN_HEAD_MODULES, "package.module:ClassName")
    cls = import_object(spec, "reward head", "package.module:ClassName", RewardError)
    if not (isinstance(cls, type) and issubclass(cls, RewardHead)):
        raise RewardError(
            f"reward head {spec!r} must be a class that subclasses rewards.heads.RewardHead "
            f"(got {type(cls).__name__})"
        )
    return cls


def resolve_head(spec: str, kwargs: dict[str, Any] | None = None, where: str = "") -> RewardHead:
    """Instantiate the head `spec` with `kwargs` (checked against its `Options` when it has
    them; `where` prefixes key names in errors). Every failure is a one-line ConfigError or
    RewardError naming the spec."""
    cls = head_class(spec)
    options = head_options(cls, dict(kwargs or {}), where or f"reward head {spec!r} kwargs")
    try:
        head = cls(**options)
    except TypeError as e:
        raise ConfigError(f"reward head {spec!r}: bad arguments {options}: {one_line(e)}") from e
    except ConfigError:
        raise
    except Exception as e:
        raise RewardError(f"reward head {spec!r}: constructing it raised {one_line(e)}") from e
    if head.granularity not in GRANULARITIES:
        raise RewardError(
            f"reward head {spec!r} has granularity {head.granularity!r}; "
            f"valid: {', '.join(GRANULARITIES)}"
        )
    return head


def build_reward_heads(specs: Sequence[Any]) -> list[tuple[RewardHead, float]]:
    """Instantiate `reward.heads` (each with `.head`, `.weight`, `.kwargs`) as (head, weight);
    names must be unique (they key metrics and checkpoints)."""
    heads = [
        (resolve_head(s.head, dict(s.kwargs), f"reward.heads.{i}.kwargs"), s.weight)
        for i, s in enumerate(specs)
    ]
    names = [head.name for head, _ in heads]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"reward.heads: two heads are named {dupes[0]!r}; names must be unique")
    return heads
