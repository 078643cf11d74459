"""Peak memory per phase of a training step: resident memory (Linux) and GPU memory.

The peak resident set size (`VmHWM`) only ever grows during a process's life; writing "5"
to `/proc/self/clear_refs` resets it to the current RSS (Linux >= 4.0), which is what
lets each phase report its own peak. Where that is not possible the phase reports the
process's peak so far (an upper bound), and `peak_rss_resettable()` says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (0 where /proc is unavailable)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return 0.0


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_resettable() -> bool:
    return _CLEAR_REFS.exists() and reset_peak_rss()


class PhaseMeter:
    """Wall time and peak memory of named phases: `with meter.phase("rollout"): ...`.

    `times[name]` in seconds (summed if a phase runs twice); `peak_rss_mb[name]` and, on
    CUDA, `peak_gpu_mb[name]` (max over repeats) in MiB.
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        reset_peak_rss()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
            self.peak_rss_mb[name] = max(self.peak_rss_mb.get(name, 0.0), peak_rss_mb())
            if cuda:
                gpu = torch.cuda.max_memory_allocated() / 2**20
                self.peak_gpu_mb[name] = max(self.peak_gpu_mb.get(name, 0.0), gpu)
