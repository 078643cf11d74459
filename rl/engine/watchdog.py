"""A hung rank ends the job within `trainer.collective_timeout_s`, with an error naming it.

Two mechanisms, because neither alone names the rank on every backend:
- the process group is created with that timeout, so a collective that waits longer raises
  on gloo (CPU) and, with `TORCH_NCCL_ASYNC_ERROR_HANDLING` (torch's default), is aborted by
  the NCCL watchdog on GPUs;
- every rank runs a heartbeat thread that bumps a counter in the process group's key-value
  store (`dense_rl/heartbeat/<rank>`) every few seconds and reads the others'. A rank whose
  counter has not moved for `timeout_s`, by this rank's own monotonic clock (no clock sync
  between nodes needed), is named on stderr and this process exits with code 3; the
  launcher then ends the rest. A stopped rank (SIGSTOP, a hung filesystem, a node that froze)
  stops its heartbeat too. When rank 0 is the one that stopped, the store it hosts stops
  answering and the store call's own timeout (the same `timeout_s`) names rank 0.

A rank stuck in Python code of its own keeps beating: then the collective's timeout fires
and `explain_hang` names the ranks whose progress (the step they last started) lags.
A rank that dies outright is the launcher's business (it ends the others within seconds).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

KEY = "dense_rl/heartbeat/"
EXIT_CODE = 3


def pg_timeout(timeout_s: float) -> timedelta:
    """The process group's timeout for `timeout_s` seconds."""
    return timedelta(seconds=timeout_s)


@dataclass
class PeerView:
    """What this rank knows of one peer: its last counter and when it last changed."""

    beat: str = ""
    step: int = -1
    changed_at: float = field(default_factory=time.monotonic)


class Heartbeat:
    """The heartbeat thread of one rank (see the module docstring)."""

    def __init__(self, store: Any, rank: int, world_size: int, timeout_s: float) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.interval_s = max(0.5, min(10.0, timeout_s / 6))
        self.peers = {r: PeerView() for r in range(world_size) if r != rank}
        self.step = 0
        """The step this rank last started (set by the trainer; shown in diagnoses)."""
        self._count = 0
        self._last_store_ok = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dense-rl-heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and watching (a finishing rank is not a hung one)."""
        self._stop.set()
        self._wake.set()
        try:
            self.store.set(f"{KEY}{self.rank}", "done")
        except Exception:
            pass

    def _beat(self) -> None:
        self._count += 1
        self.store.set(f"{KEY}{self.rank}", f"{self._count} {self.step}")

    def new_step(self, step: int) -> None:
        """Record the step this rank starts and beat now (from the thread), so that peers see
        the step a rank stopped in."""
        self.step = step
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._beat()
                self._read_peers()
                self._last_store_ok = time.monotonic()
            except Exception as e:  # the store (hosted by rank 0) did not answer in time
                if self._stop.is_set():
                    return
                if time.monotonic() - self._last_store_ok >= self.timeout_s:
                    self._halt(
                        f"rank 0 stopped answering: the rendezvous store it hosts gave no "
                        f"reply for {time.monotonic() - self._last_store_ok:.0f} s "
                        f"({type(e).__name__})"
                    )
                continue
            stale = self.stale_ranks()
            if stale and not self._stop.is_set():
                self._halt(self.describe(stale))

    def _read_peers(self) -> None:
        now = time.monotonic()
        for r, view in self.peers.items():
            value = self.store.get(f"{KEY}{r}").decode()
            if value != view.beat:
                view.beat, view.changed_at = value, now
                if value != "done":
                    view.step = int(value.split()[1])

    def stale_ranks(self, after_s: float | None = None) -> list[int]:
        """Peers whose heartbeat has not moved for `after_s` (default `timeout_s`; finished
        ones excluded)."""
        now = time.monotonic()
        limit = self.timeout_s if after_s is None else after_s
        return [
            r for r, v in self.peers.items() if v.beat != "done" and now - v.changed_at >= limit
        ]

    def describe(self, ranks: list[int]) -> str:
        now = time.monotonic()
        parts = [
            f"rank {r} stopped answering: no heartbeat for {now - self.peers[r].changed_at:.0f} s "
            f"(its last heartbeat came during step {self.peers[r].step})"
            for r in ranks
        ]
        return "; ".join(parts) + f" (trainer.collective_timeout_s={self.timeout_s:g})"

    def lagging_ranks(self) -> list[int]:
        """Peers that last started an earlier step than this rank."""
        return [r for r, v in self.peers.items() if v.beat != "done" and v.step < self.step]

    def _halt(self, message: str) -> None:
        print(
            f"error (rank {self.rank}): {message}; ending this rank (resume with "
            "trainer.resume=auto)",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(EXIT_CODE)  # the main thread is blocked in the collective: end the process


_HEARTBEAT: Heartbeat | None = None


def start(rank: int, world_size: int, timeout_s: float) -> None:
    """Start this rank's heartbeat on the default process group's store (multi-rank only)."""
    global _HEARTBEAT
    if world_size < 2 or _HEARTBEAT is not None:
        return
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    _HEARTBEAT = Heartbeat(store, rank, world_size, timeout_s)
    _HEARTBEAT.start()


def set_step(step: int) -> None:
    """Record the step this rank is starting (shown when a peer diagnoses a hang)."""
    if _HEARTBEAT is not None:
        _HEARTBEAT.new_step(step)


def stop() -> None:
    global _HEARTBEAT
    if _HEARTBEAT is not None:
        _HEARTBEAT.stop()
        _HEARTBEAT = None


def explain_hang(err: BaseException) -> str | None:
    """For a collective that timed out: which ranks it waited for, as one line; None when
    `err` is not a timeout."""
    text = str(err)
    if "imed out" not in text and "timeout" not in text.lower():
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    hb = _HEARTBEAT
    if hb is None:
        return f"a collective timed out ({first})"
    # The collective's timeout and the heartbeat's are the same length and race: a peer that
    # missed three beats when the collective gave up is the one it waited for.
    ranks = hb.stale_ranks(after_s=3 * hb.interval_s) or hb.lagging_ranks()
    who = (
        hb.describe(ranks)
        if ranks
        else "no rank's heartbeat stopped (a rank stuck in its own code?)"
    )
    return f"{who}; a collective on rank {hb.rank} timed out: {first}"
