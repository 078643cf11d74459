"""Per-phase peak memory: a phase that allocates shows a higher peak than one that does not."""

from __future__ import annotations

import pytest
import torch

from rl.engine.memory import PhaseMeter, peak_rss_mb, peak_rss_resettable


def test_phase_peaks_separate_phases() -> None:
    if not peak_rss_resettable():
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    meter = PhaseMeter()
    with meter.phase("small"):
        torch.zeros(10)
    with meter.phase("big"):
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del big
    with meter.phase("small_again"):
        torch.zeros(10)
    assert meter.peak_rss_mb["big"] - meter.peak_rss_mb["small"] > 48
    assert meter.peak_rss_mb["small_again"] < meter.peak_rss_mb["big"] - 48
    assert set(meter.times) == {"small", "big", "small_again"}
    assert peak_rss_mb() > 0
