"""Preemption: SIGTERM or SIGUSR1 (what SLURM's `scancel`, a preemption and Kubernetes send
before killing) asks the run to stop at the end of the current step.

The handler only records the signal, so the step in progress finishes on every rank; at the
step's end the ranks agree (one all-reduce: any rank that got it counts), write a complete
checkpoint and exit 0 with a line saying how to resume. Later signals, e.g. a second one
while the checkpoint is being written, find the request already recorded and change nothing.
Under `deepspeed`, the launcher forwards SIGTERM to the ranks and kills any still running 30 s
later, so a step plus a save must fit in that; the launcher itself then exits 1 whatever the
ranks did (torchrun likewise reports the signal), so look for the resume line.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import torch

from rl.engine import deepspeed_engine as eng

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Records the first preemption signal; `requested()` is the ranks' joint verdict."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch the preemption signals in this (main) thread instead of dying on them."""
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back their earlier handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:  # the first one counts; repeats change nothing
            self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any rank has received a preemption signal. Collective: call it at the same
        point of every step on every rank."""
        mine = torch.tensor([1.0 if self.signal_name is not None else 0.0], dtype=torch.float64)
        return bool(eng.all_reduce_max(mine)[0] > 0)


def resume_line(signal_name: str | None, step: int, checkpoint: str) -> str:
    """What the run prints when it stops for a preemption."""
    return (
        f"preempted ({signal_name or 'signal on another rank'}) at step {step}: complete "
        f"checkpoint {checkpoint}; resume with the same command plus trainer.resume=auto"
    )
