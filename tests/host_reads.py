"""Counting host reads of tensors (`.item()`, `.tolist()`, `float()`, `int()`, `bool()`,
`.cpu()`): on a GPU each one waits for the device, so a loop over micro-batches or rows
should make none. On the CPU the same calls are counted, so a test sees where a GPU run
would wait."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu")


@contextmanager
def counted_host_reads() -> Iterator[list[str]]:
    """Inside the block, every host read of a tensor appends its method's name to the
    yielded list (the methods are restored on exit)."""
    reads: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str) -> Any:
        original = saved[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        yield reads
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
