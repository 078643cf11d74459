"""Typed settings from plain mappings: a dataclass per section, unknown keys an error naming
the key (and the closest valid one), values checked against the field's type hint and its
bounds (`Annotated[float, Bound(ge=0)]`), floats finite. A field whose type is a *tagged
union* (a dataclass base class with `variants()`, see `build_variant`) takes one variant by
its `name` key, or the bare name for its defaults.

Used by the run config (`rl.config`) and by every typed option block that arrives as a
mapping (credit-scheme hyperparameters, reward-head kwargs). Imports nothing but the
standard library and `rl.core.errors`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from rl.core.errors import ConfigError

D = TypeVar("D")


@dataclass(frozen=True)
class Bound:
    """A field's allowed range, declared on the field: `Annotated[int, Bound(ge=1)]`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""
    """Shown in the error after the range, e.g. "0 = keep all"."""

    def violation(self, value: float) -> str | None:
        """What `value` breaks ("must be at least 1", "must be in (0, 1]"), or None."""
        low, high = (
            self.ge if self.ge is not None else self.gt,
            self.le if self.le is not None else self.lt,
        )
        if low is not None and high is not None:
            inside = (value >= low if self.ge is not None else value > low) and (
                value <= high if self.le is not None else value < high
            )
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            return None if inside else f"must be in {left}{_num(low)}, {_num(high)}{right}"
        if self.ge is not None and value < self.ge:
            return f"must be at least {_num(self.ge)}"
        if self.gt is not None and value <= self.gt:
            return "must be positive" if self.gt == 0 else f"must be greater than {_num(self.gt)}"
        if self.le is not None and value > self.le:
            return f"must be at most {_num(self.le)}"
        if self.lt is not None and value >= self.lt:
            return f"must be less than {_num(self.lt)}"
        return None

    def check(self, value: Any, key: str) -> None:
        """ConfigError naming `key`, the bound and `value` when it is out of range."""
        broken = self.violation(value)
        if broken is not None:
            why = f" ({self.why})" if self.why else ""
            raise ConfigError(f"{key}: {broken}{why}, got {value!r}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from mapping `raw`; unknown keys raise naming the key."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {key: convert(hints[key], value, f"{prefix}{key}") for key, value in raw.items()}
    return cls(**kwargs)


def convert(hint: Any, value: Any, key: str) -> Any:
    """Check/convert one value against its type hint; errors name the dotted key."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        converted = convert(base, value, key)
        for extra in extras:
            if isinstance(extra, Bound) and converted is not None:
                extra.check(converted, key)
        return converted
    if dataclasses.is_dataclass(hint) and hasattr(hint, "variants"):
        return build_variant(hint, value, key)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [convert(item_hint, v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(convert(h, v, key) for h, v in zip(typing.get_args(hint), value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        return to_float(value, key)
    if hint in (int, str, bool) and type(value) is not hint:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def build_variant(base: Any, raw: Any, key: str) -> Any:
    """One variant of the tagged union `base` (its `variants()`: name -> dataclass; its
    `kind` names them in errors; its `name` default is the default variant) from
    `{name: ..., <its options>}`, the options alone, or the bare name; errors name the key,
    the valid names, and for an option the chosen variant lacks, who has it."""
    kind = getattr(base, "kind", key.rsplit(".", 1)[-1])
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a name or a mapping with a `name` key, got {raw!r}")
    raw = {"name": base.name, **raw}  # options alone: the default variant's
    variants: dict[str, type] = base.variants()
    name = raw["name"]
    if name not in variants:
        close = difflib.get_close_matches(str(name), list(variants), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        valid = ", ".join(variants)
        raise ConfigError(f"{key}: unknown {kind} {name!r}{hint}; valid: {valid}")
    chosen = variants[name]
    own = {f.name for f in dataclasses.fields(chosen)}
    for option in raw:
        others = [
            n for n, v in variants.items() if option in {f.name for f in dataclasses.fields(v)}
        ]
        if option not in own and others:
            raise ConfigError(
                f"{key}.{option}: {key}={name} has no option {option!r} ({', '.join(others)} "
                "has it)"
            )
    return build_dataclass(chosen, raw, prefix=f"{key}.")


def to_float(value: Any, key: str) -> float:
    """A finite float from a number or a numeric string (YAML 1.1 reads `1e-3` as a
    string)."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number


def parse_options(cls: type[D], raw: Any, where: str) -> D:
    """Instantiate the option dataclass `cls` from `raw` (a mapping, or None for all
    defaults); errors name `where.<key>`, e.g. `algo.credit_kwargs.alpha`."""
    out: D = build_dataclass(cls, {} if raw is None else raw, prefix=f"{where}.")
    return out
