"""Built-in tasks: prompts, answers, exact step labels and verifiers, made locally."""

from __future__ import annotations

from typing import Any

from rl.core.errors import ConfigError, DataError

BUILTINS: tuple[str, ...] = ("arith",)
"""Names of the built-in tasks `builtin_rows` can make."""


def builtin_rows(name: str, split: str, n: int, seed: int, **task_kwargs: Any) -> list[dict]:
    """`n` rows `{"prompt", "answer"}` of built-in task `name`, split `split`.

    `task_kwargs` are the task's config fields (for "arith": `rl.tasks.arith.ArithConfig`).
    Raises DataError for an unknown task or split, ConfigError for a bad task kwarg.
    """
    if name == "arith":
        from rl.tasks import arith

        if split not in arith.SPLITS:
            raise DataError(
                f"builtin {name!r}: unknown split {split!r}; valid: {', '.join(arith.SPLITS)}"
            )
        try:
            cfg = arith.ArithConfig(**task_kwargs)
        except TypeError as e:
            raise ConfigError(f"builtin {name!r}: bad task option ({e})") from e
        except ValueError as e:
            raise ConfigError(f"builtin {name!r}: {e}") from e
        return arith.rows(split, n, cfg, seed)
    raise DataError(f"unknown builtin task {name!r}; valid: {', '.join(BUILTINS)}")
