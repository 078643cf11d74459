"""A small name -> object registry. Duplicate names raise; unknown names list the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from rl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (functions or classes) of one kind, e.g. advantage estimators."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("grpo")`. Raises if `name` is already taken."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered as `name`; a ConfigError naming the closest valid name if none."""
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
