"""A small name -> object registry. Duplicate names raise; unknown names list the valid ones."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from rl.core.errors import ConfigError, UserError, one_line

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


def import_object(spec: str, what: str, form: str, error: type[UserError]) -> Any:
    """The object at `package.module:attr` (dotted attrs allowed) for a user plug-in.

    `what` names the plug-in kind in messages ("reward function"), `form` the expected
    spelling ("package.module:function"); every failure is a one-line `error` naming `spec`.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"{what} {spec!r}: expected '{form}'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise error(
                f"{what} {spec!r}: no module named {module_name!r} "
                "(is it installed or on PYTHONPATH?)"
            ) from e
        raise error(f"{what} {spec!r}: importing it failed: {one_line(e)}") from e
    except Exception as e:  # the module itself raised while importing
        raise error(f"{what} {spec!r}: importing it failed: {one_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
