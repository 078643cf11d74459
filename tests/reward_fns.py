"""User-style reward functions (TRL signature) loaded by import path in end-to-end tests."""

from __future__ import annotations

from typing import Any


def digit_fraction(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """Share of characters that are digits: a dense, always-varying reward, so even an
    untrained policy gets non-zero group advantages."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def not_a_number(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """Returns NaN for every completion: the trainer must stop and name this function."""
    return [float("nan")] * len(completions)


def sleep_forever(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """Never returns (a reward server that stopped answering)."""
    import time

    while True:
        time.sleep(3600)


def fails_on_odd_length(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """Raises whenever a completion has an odd number of characters (a parser that chokes on
    some rows); scores 1 otherwise."""
    if any(len(text) % 2 for text in completions):
        raise ValueError("cannot parse")
    return [1.0] * len(completions)
