"""Typed settings from plain mappings: a dataclass per section, unknown keys an error naming
the key (and the closest valid one), values checked against the field's type hint.

Used by the run config (`rl.config`) and by every typed option block that arrives as a
mapping (credit-scheme hyperparameters, reward-head kwargs). Imports nothing but the
standard library and `rl.core.errors`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar

from rl.core.errors import ConfigError

D = TypeVar("D")


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from mapping `raw`; unknown keys raise naming the key."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
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


def to_float(value: Any, key: str) -> float:
    """A float from a number or a numeric string (YAML 1.1 reads `1e-3` as a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def parse_options(cls: type[D], raw: Any, where: str) -> D:
    """Instantiate the option dataclass `cls` from `raw` (a mapping, or None for all
    defaults); errors name `where.<key>`, e.g. `algo.credit_kwargs.alpha`."""
    out: D = build_dataclass(cls, {} if raw is None else raw, prefix=f"{where}.")
    return out
