"""Fault injection for the fault tests (`tests/test_faults_e2e.py`), driven by environment
variables so that the real launcher runs the real code path. Unset, each is a no-op.

- `DENSE_RL_KILL_AFTER_STEP=k`: every rank SIGKILLs itself right after step k is logged
  (and saved, if it is a save step), like a machine loss.
- `DENSE_RL_NAN_AT_STEP=k[,k...]`: the fault rank's policy loss is NaN in step k (1-based),
  so its gradient is NaN and the reduced gradient on every rank too.
- `DENSE_RL_STOP_AT_STEP=k`: the fault rank SIGSTOPs itself after step k (a rank that stops
  answering: alive, holding its sockets, never reaching the next collective).
- `DENSE_RL_SIGNAL_DURING_SAVE=SIG`: a rank that already got a preemption signal sends
  itself signal SIG (e.g. SIGTERM) again while writing the preemption checkpoint, after
  DeepSpeed's files and before `COMPLETE`: a second signal arriving during the save.
- `DENSE_RL_FAULT_RANK=r`: the rank the per-rank faults hit (default: the last rank).
"""

from __future__ import annotations

import os
import signal


def _env_steps(name: str) -> set[int]:
    text = os.environ.get(name, "").strip()
    return {int(part) for part in text.split(",") if part.strip()} if text else set()


def fault_rank(world_size: int) -> int:
    """The rank that per-rank faults hit."""
    return int(os.environ.get("DENSE_RL_FAULT_RANK", str(world_size - 1)))


def simulate_crash_if_asked(step: int) -> None:
    """`DENSE_RL_KILL_AFTER_STEP=k`: SIGKILL this process after step k."""
    if step in _env_steps("DENSE_RL_KILL_AFTER_STEP"):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(step: int, rank: int, world_size: int) -> bool:
    """`DENSE_RL_NAN_AT_STEP`: whether this rank's loss is made NaN in (1-based) `step`."""
    return step in _env_steps("DENSE_RL_NAN_AT_STEP") and rank == fault_rank(world_size)


def stop_if_asked(step: int, rank: int, world_size: int) -> None:
    """`DENSE_RL_STOP_AT_STEP=k`: the fault rank SIGSTOPs itself after step k."""
    if step in _env_steps("DENSE_RL_STOP_AT_STEP") and rank == fault_rank(world_size):
        print(f"fault injection: rank {rank} stops (SIGSTOP) after step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)


def signal_during_save(preempted: bool) -> None:
    """`DENSE_RL_SIGNAL_DURING_SAVE=SIGTERM`: once preempted, send this process that signal."""
    name = os.environ.get("DENSE_RL_SIGNAL_DURING_SAVE")
    if name and preempted:
        print(f"fault injection: {name} again during the checkpoint save", flush=True)
        os.kill(os.getpid(), getattr(signal, name))
