"""Stale torch-extension build locks: the live/stale decision, the watchdog's lines, and a
real torch FileBaton that stops waiting once the stale lock is removed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from rl.engine.op_locks import (
    LockWatchdog,
    OpBuildInterrupted,
    clear_stale_locks,
    find_baton_locks,
    inspect_lock,
    remove_if_unchanged,
    watch_op_builds,
)

OP = "deepspeed_shm_comm"


def make_lock(root: Path, age_s: float = 0.0, op: str = OP) -> Path:
    """`<root>/<op>/lock` as torch's FileBaton leaves it, `age_s` seconds old."""
    build_dir = root / op
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    if age_s:
        then = time.time() - age_s
        os.utime(lock, (then, then))
    return lock


def hold_open(lock: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """A fake baton holder: a python that keeps `lock` open, as FileBaton's holder does."""
    code = f"import os, time; fd = os.open({str(lock)!r}, os.O_RDONLY); print(1, flush=True); "
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "time.sleep(60)"], cwd=cwd, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline()  # the file is open now
    return proc


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The live python holding an old `<tmp>/ext/<op>/lock`."""
    proc = hold_open(make_lock(tmp_path / "ext", age_s=300), tmp_path)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def compiler(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A fake compiler: a process whose cwd is the op's build directory."""
    build_dir = tmp_path / "ext" / OP
    build_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["sleep", "60"], cwd=build_dir)
    yield proc
    proc.kill()
    proc.wait()


def test_finds_locks_under_env_and_default_layouts(tmp_path: Path) -> None:
    a = make_lock(tmp_path)
    b = make_lock(tmp_path / "py311_cpu", op="cpu_adam")
    (tmp_path / "other").mkdir()
    assert find_baton_locks(tmp_path) == sorted([a, b])
    assert find_baton_locks(tmp_path / "missing") == []


def test_baton_holder_is_live_then_stale_once_it_dies(
    tmp_path: Path, holder: subprocess.Popen[bytes]
) -> None:
    lock = tmp_path / "ext" / OP / "lock"
    status = inspect_lock(lock)
    assert status is not None and status.holders == (holder.pid,)
    assert not status.is_stale()
    holder.kill()
    holder.wait()
    status = inspect_lock(lock)
    assert status is not None and status.holders == ()
    assert status.is_stale()


def test_orphaned_compiler_does_not_keep_a_lock_alive(
    tmp_path: Path, compiler: subprocess.Popen[bytes]
) -> None:
    """ninja runs each compile in its own process group: it outlives `kill -9 -- -<pgid>`
    of the run, and nobody will remove the lock it runs beside."""
    lock = make_lock(tmp_path / "ext", age_s=300)
    status = inspect_lock(lock)
    assert status is not None and status.holders == () and status.builders == (compiler.pid,)
    assert status.is_stale()
    lines: list[str] = []
    assert clear_stale_locks(tmp_path / "ext", emit=lines.append) == [lock]
    assert f"(its orphaned compile processes, pids {compiler.pid}, finish on" in lines[0]


def test_young_orphan_lock_is_not_stale(tmp_path: Path) -> None:
    status = inspect_lock(make_lock(tmp_path, age_s=5))
    assert status is not None and status.holders == ()
    assert not status.is_stale(stale_after_s=30)


def test_watchdog_names_the_live_holder_once_a_minute(
    tmp_path: Path, holder: subprocess.Popen[bytes]
) -> None:
    lock = tmp_path / "ext" / OP / "lock"
    lines: list[str] = []
    dog = LockWatchdog(tmp_path / "ext", report_every_s=60, emit=lines.append)
    t0 = time.time()
    for dt in (0, 30, 59):
        dog.check_once(now=t0 + dt)
    assert lines == []
    dog.check_once(now=t0 + 61)
    dog.check_once(now=t0 + 90)
    assert len(lines) == 1
    assert lines[0].startswith(
        f"op-lock: waiting on {lock} held by pid {holder.pid} ({sys.executable} -c import os"
    )
    assert lines[0].endswith("(61 s so far)")
    dog.check_once(now=t0 + 122)
    assert len(lines) == 2 and lock.exists()


def test_watchdog_removes_a_stale_lock_after_two_looks(tmp_path: Path) -> None:
    lock = make_lock(tmp_path, age_s=300)
    lines: list[str] = []
    dog = LockWatchdog(tmp_path, poll_s=2, emit=lines.append)
    t0 = time.time()
    dog.check_once(now=t0)
    assert lock.exists() and lines == []
    dog.check_once(now=t0 + 2)
    assert not lock.exists()
    assert lines == [
        f"op-lock: removed stale lock {lock} left by a killed build; the waiting load"
        " continues (if the op was never built, the run stops and asks for a rerun)"
    ]
    assert dog.removed == [lock] and dog.judged_stale == {lock}


def test_watchdog_leaves_a_young_orphan_until_it_ages(tmp_path: Path) -> None:
    lock = make_lock(tmp_path, age_s=1)
    dog = LockWatchdog(tmp_path, stale_after_s=30, poll_s=2, emit=lambda line: None)
    t0 = time.time()
    dog.check_once(now=t0)
    dog.check_once(now=t0 + 10)
    assert lock.exists()
    dog.check_once(now=t0 + 30)
    dog.check_once(now=t0 + 32)
    assert not lock.exists()


def test_remove_if_unchanged_keeps_a_new_lock(tmp_path: Path) -> None:
    lock = make_lock(tmp_path, age_s=300)
    status = inspect_lock(lock)
    assert status is not None
    lock.unlink()
    make_lock(tmp_path)  # another run took the baton in between
    assert not remove_if_unchanged(lock, status.ident)
    assert lock.exists() and [p.name for p in lock.parent.iterdir()] == ["lock"]


def test_start_check_clears_stale_keeps_live_and_waits_out_young(
    tmp_path: Path, holder: subprocess.Popen[bytes]
) -> None:
    root = tmp_path / "ext"
    live = root / OP / "lock"
    stale = make_lock(root, age_s=300, op="cpu_adam")
    young = make_lock(root, age_s=0, op="fused_adam")
    lines: list[str] = []
    start = time.monotonic()
    removed = clear_stale_locks(root, stale_after_s=0.5, poll_s=0.05, emit=lines.append)
    assert time.monotonic() - start < 5
    assert sorted(removed) == sorted([stale, young])
    assert live.exists() and not stale.exists() and not young.exists()
    assert any("has no live holder" in line and str(young) in line for line in lines)


def test_two_ranks_waiting_on_a_stale_lock_proceed(tmp_path: Path) -> None:
    """Two FileBatons wait on a lock a killed build left, each beside a watchdog: exactly
    one removes it and both batons return."""
    lock = make_lock(tmp_path, age_s=300)
    lines: list[str] = []
    dogs = [LockWatchdog(tmp_path, poll_s=0.05, emit=lines.append) for _ in range(2)]
    for dog in dogs:
        dog.start()
    done: list[float] = []
    start = time.monotonic()

    def wait() -> None:
        FileBaton(str(lock), wait_seconds=0.01).wait()
        done.append(time.monotonic() - start)

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(timeout=10)
    for dog in dogs:
        dog.stop()
    assert len(done) == 2 and max(done) < 5
    assert [line for line in lines if "removed stale lock" in line] == [lines[0]]


def test_peer_rank_knows_its_lock_was_removed_as_stale(tmp_path: Path) -> None:
    lock = make_lock(tmp_path, age_s=300)
    remover, peer = (LockWatchdog(tmp_path, poll_s=2, emit=lambda line: None) for _ in "ab")
    t0 = time.time()
    peer.check_once(now=t0)
    remover.check_once(now=t0)
    remover.check_once(now=t0 + 2)
    peer.check_once(now=t0 + 2)
    assert not lock.exists() and remover.removed == [lock] and peer.removed == []
    assert remover.judged_stale == peer.judged_stale == {lock}


def test_load_error_after_removed_lock_is_one_line(
    tmp_path: Path, holder: subprocess.Popen[bytes]
) -> None:
    """The holder dies while this process waits; the watchdog removes its lock; the op's
    .so was never built, so the load fails and the run stops asking for a rerun."""
    root = tmp_path / "ext"
    lock = root / OP / "lock"
    with pytest.raises(OpBuildInterrupted, match=f"DeepSpeed op {OP} was not built: a killed"):
        with watch_op_builds(root, poll_s=0.05, emit=lambda line: None):
            holder.kill()
            holder.wait()
            FileBaton(str(lock), wait_seconds=0.01).wait()
            raise ImportError(f"{lock.parent / OP}.so: cannot open shared object file")


def test_load_error_after_the_holders_build_failed_is_one_line(
    tmp_path: Path, holder: subprocess.Popen[bytes]
) -> None:
    root = tmp_path / "ext"
    lock = root / OP / "lock"
    with pytest.raises(OpBuildInterrupted, match="ended without it.*rerun the same command"):
        with watch_op_builds(root, poll_s=0.05, emit=lambda line: None) as dog:
            while lock not in dog._first_seen:  # the watchdog has seen the lock
                time.sleep(0.01)
            lock.unlink()  # the holder's build failed; it released the baton
            FileBaton(str(lock), wait_seconds=0.01).wait()
            raise ImportError(f"{lock.parent / OP}.so: cannot open shared object file")


def test_own_build_is_reported_as_building_and_its_errors_pass(tmp_path: Path) -> None:
    (tmp_path / OP).mkdir()
    baton = FileBaton(str(tmp_path / OP / "lock"))
    assert baton.try_acquire()
    lines: list[str] = []
    with pytest.raises(ImportError):
        with watch_op_builds(tmp_path, poll_s=1, emit=lines.append) as dog:
            t0 = time.time()
            dog.check_once(now=t0)
            dog.check_once(now=t0 + 61)
            baton.release()
            raise ImportError(f"{OP}.so: cannot open shared object file")
    assert len(lines) == 1 and lines[0].startswith(f"op-lock: building {OP} (")


def test_unrelated_load_error_is_left_alone(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="something else"):
        with watch_op_builds(tmp_path, poll_s=0.05, emit=lambda line: None):
            raise ImportError("something else")
