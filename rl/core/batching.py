"""Splitting a batch into consecutive chunks (micro-batches, forward-only passes)."""

from __future__ import annotations


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Row indices `0..n-1` in consecutive chunks of at most `size`: n=5, size=2 ->
    [[0, 1], [2, 3], [4]]."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]
