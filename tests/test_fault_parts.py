"""The fault-handling parts without a launcher: skip tracking, update-input checks, the
preemption flag, the heartbeat watchdog (issue 38)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from rl.core.errors import HaltError
from rl.core.types import Credit, LogProbs
from rl.engine.watchdog import Heartbeat, explain_hang
from rl.trainer.nonfinite import SkipTracker, inputs_verdict, local_fault
from rl.trainer.preemption import Preemption, resume_line


def test_skip_tracker_counts_in_a_row_and_halts_at_the_limit() -> None:
    tracker = SkipTracker(limit=2)
    assert tracker.record({"train/skipped_steps": 1.0}) == 1
    tracker.check(5, "ckpt/step_4")
    assert tracker.record({"train/skipped_steps": 0.0}) == 0 and tracker.in_a_row == 0
    tracker.record({"train/skipped_steps": 1.0})
    tracker.record({"train/skipped_steps": 0.0, "critic/skipped_steps": 1.0})
    halt = r"^step 9: 2 optimizer steps in a row skipped .* ckpt/step_4\. "
    with pytest.raises(HaltError, match=halt):
        tracker.check(9, "ckpt/step_4")


def test_local_fault_finds_nan_on_response_tokens_only() -> None:
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([[0.5, 0.5, float("nan")]])  # NaN on padding: harmless
    old = torch.tensor([[-float("inf"), -1.0, float("nan")]])  # -inf is clamped later
    assert local_fault(Credit(adv), LogProbs(old), mask) is None
    assert local_fault(Credit(torch.tensor([[0.5, float("inf"), 0]])), LogProbs(None), mask) == (
        "advantages"
    )
    ref = torch.tensor([[float("nan"), 0.0, 0.0]])
    assert local_fault(Credit(torch.zeros(1, 3)), LogProbs(None, ref), mask) == "ref log-probs"


def test_inputs_verdict_names_the_rank() -> None:
    assert inputs_verdict(None, 0, 1) is None
    assert inputs_verdict("advantages", 0, 1) == "non-finite advantages on rank 0"


def test_preemption_records_the_first_signal_only() -> None:
    flag = Preemption()
    flag.install()
    try:
        assert not flag.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing, kills nothing
        time.sleep(0.01)
        assert flag.signal_name == "SIGUSR1" and flag.requested()
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert resume_line("SIGTERM", 7, "out/checkpoints/step_00000007") == (
        "preempted (SIGTERM) at step 7: complete checkpoint out/checkpoints/step_00000007; "
        "resume with the same command plus trainer.resume=auto"
    )


class _Store:
    """The key-value part of a torch.distributed store."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.data[key]


def test_heartbeat_names_a_peer_that_stopped_beating() -> None:
    store = _Store()
    me = Heartbeat(store, rank=0, world_size=3, timeout_s=0.3)
    peers = [Heartbeat(store, rank=r, world_size=3, timeout_s=0.3) for r in (1, 2)]
    for hb in (me, *peers):
        hb._beat()
    peers[1].step = 4
    for _ in range(5):  # rank 1 beats on, rank 2 has stopped after its step-4 beat
        peers[0]._beat()
        peers[1]._beat() if _ == 0 else None
        me._read_peers()
        time.sleep(0.1)
    assert me.stale_ranks() == [2]
    assert me.describe([2]).startswith("rank 2 stopped answering: no heartbeat for ")
    assert "its last heartbeat came during step 4" in me.describe([2])
    peers[1].stop()  # a finished rank is not a hung one
    me._read_peers()
    assert me.stale_ranks() == []


def test_explain_hang_only_for_timeouts() -> None:
    assert explain_hang(RuntimeError("shape mismatch")) is None
    line = explain_hang(RuntimeError("Timed out waiting 60000ms for recv operation"))
    assert line is not None and "timed out" in line


def test_a_timed_out_collective_names_the_silent_peer_before_the_heartbeat_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The collective's timeout and the heartbeat's have the same length and race (seen: the
    gloo recv gave up first, and the error said no heartbeat had stopped): a peer silent for
    three beats when a collective times out is the one named."""
    import rl.engine.watchdog as watchdog

    store = _Store()
    me = Heartbeat(store, rank=0, world_size=2, timeout_s=60.0)
    peer = Heartbeat(store, rank=1, world_size=2, timeout_s=60.0)
    peer.step = 2
    peer._beat()
    me._read_peers()
    me.peers[1].changed_at -= 3 * me.interval_s + 1  # silent for 31 s: under the 60 s limit
    assert me.stale_ranks() == []
    monkeypatch.setattr(watchdog, "_HEARTBEAT", me)
    line = explain_hang(RuntimeError("Timed out waiting 60000ms for recv operation to complete"))
    assert line is not None and line.startswith("rank 1 stopped answering"), line
