"""Stale build locks of DeepSpeed's JIT-compiled ops.

DeepSpeed compiles its C++ ops (on CPU: `deepspeed_shm_comm` at `deepspeed.init_distributed`,
`cpu_adam` for an offloaded optimizer) with torch.utils.cpp_extension, under
`$TORCH_EXTENSIONS_DIR/<op>/`. torch guards each build with a `FileBaton`: the process that
creates `<op>/lock` (O_CREAT | O_EXCL) keeps that file open while it checks and builds the
op, then closes and removes it; every other process polls until the file is gone, silently
and with no time limit, then loads `<op>/<op>.so`. A run killed while it held the baton
leaves the file, and every later run waits forever.

`watch_op_builds` wraps the calls that may build an op. On entry it removes locks that no
live process holds (waiting for a young one to age first); while the body runs, a daemon
thread says once a minute which lock this process waits on and who holds it, and removes a
lock whose holder died. If the op was then never built, the load error becomes one line
telling the user to rerun (the rerun builds it, since the lock is gone).

Live means: a process has the lock file open (the python that took the baton, for as long as
it holds it). Processes whose cwd is the op's build directory (ninja and the compiler) are
named too, but do not keep a lock alive on their own: ninja starts each compile in its own
process group, so `kill -9 -- -<pgid>` of a run leaves its compilers running, orphaned, and
they never remove the lock. A lock younger than `STALE_AFTER_S` counts as live whatever the
scan finds. Processes in another PID namespace or on another host sharing the directory are
invisible to the scan; a lock another user created is reported, never removed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rl.core.errors import UserError

LOCK_NAME = "lock"  # torch.utils.cpp_extension._jit_compile: FileBaton(<build dir>/lock)
STALE_AFTER_S = 30.0  # younger locks may be between the steps of a live build
REPORT_EVERY_S = 60.0  # one "waiting on ..." line per lock this often
POLL_S = 2.0  # how often the watchdog looks; a stale lock must look so on two looks

Emit = Callable[[str], None]


class OpBuildInterrupted(UserError):
    """An op's load failed after the build this process waited for went away unfinished."""


@dataclass(frozen=True)
class LockStatus:
    """One baton lock file as seen at one moment."""

    path: Path
    ident: tuple[int, int, int]  # (st_dev, st_ino, st_mtime_ns): which file this is
    age_s: float
    holders: tuple[int, ...]  # processes with the lock file open: the baton's holder
    builders: tuple[int, ...]  # processes running in the build directory (ninja, compiler)
    owner_uid: int

    @property
    def op(self) -> str:
        """The op's name (its build directory's name)."""
        return self.path.parent.name

    @property
    def foreign(self) -> bool:
        """Created by another user, whose processes this user may not be able to inspect."""
        return self.owner_uid != os.getuid() and os.getuid() != 0

    def is_stale(self, stale_after_s: float = STALE_AFTER_S) -> bool:
        """No live holder, old enough not to be between build steps, and ours to judge."""
        return not self.holders and not self.foreign and self.age_s >= stale_after_s


def extensions_root() -> Path:
    """Where torch caches JIT-built extensions: $TORCH_EXTENSIONS_DIR (rl.cli sets it to
    the environment's torch_extensions), else torch's default root."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def find_baton_locks(root: Path) -> list[Path]:
    """Baton files under `root`: `<root>/<op>/lock`, or `<root>/<py…_cpu>/<op>/lock` under
    torch's default root."""
    if not root.is_dir():
        return []
    found = {*root.glob(f"*/{LOCK_NAME}"), *root.glob(f"*/*/{LOCK_NAME}")}
    return sorted(p for p in found if p.is_file())


def process_cmdline(pid: int, limit: int = 100) -> str:
    """`pid`'s command line, shortened to `limit` characters ('?' when unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"
    return cmd if len(cmd) <= limit else cmd[: limit - 3] + "..."


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _has_open(pid: int, path: str) -> bool:
    """True when `pid` has `path` open (False when its fds are unreadable)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def _runs_in(pid: int, directory: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd") == directory
    except OSError:
        return False


def lock_processes(lock: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(holders, builders): processes that have `lock` open (the python that took the
    baton keeps it open until it removes it), and processes whose cwd is its build
    directory (torch runs ninja there, and ninja the compiler)."""
    real = os.path.realpath(lock)
    build_dir = os.path.dirname(real)
    holders, builders = [], []
    for pid in _pids():
        if _has_open(pid, real):
            holders.append(pid)
        elif _runs_in(pid, build_dir):
            builders.append(pid)
    return tuple(holders), tuple(builders)


def inspect_lock(lock: Path, now: float | None = None) -> LockStatus | None:
    """The lock's status, or None when the file is gone."""
    try:
        st = lock.stat()
    except FileNotFoundError:
        return None
    holders, builders = lock_processes(lock)
    now = time.time() if now is None else now
    return LockStatus(
        path=lock,
        ident=(st.st_dev, st.st_ino, st.st_mtime_ns),
        age_s=max(0.0, now - st.st_mtime),
        holders=holders,
        builders=builders,
        owner_uid=st.st_uid,
    )


def _pid_list(pids: tuple[int, ...]) -> str:
    more = f" and {len(pids) - 1} more" if len(pids) > 1 else ""
    return f"pid {pids[0]} ({process_cmdline(pids[0])}){more}"


def describe_holder(status: LockStatus) -> str:
    """`held by pid N (<cmd>)`, or why nobody seems to hold it."""
    if status.holders:
        return f"held by {_pid_list(status.holders)}"
    if status.foreign:
        return f"created by uid {status.owner_uid}; cannot tell whether its holder is alive"
    return f"with no live holder, {status.age_s:.0f} s old"


def remove_if_unchanged(lock: Path, ident: tuple[int, int, int]) -> bool:
    """Remove `lock` if it is still the file identified by `ident`; True when removed.

    Renames first, so that of several processes judging the same lock stale exactly one
    removes it, and a new lock another run created in the meantime is put back."""
    aside = lock.with_name(f"{LOCK_NAME}.stale.{os.getpid()}.{threading.get_ident()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    st = aside.stat()
    if (st.st_dev, st.st_ino, st.st_mtime_ns) == ident:
        aside.unlink()
        return True
    try:  # not the file we judged: restore it unless yet another lock took its place
        os.link(aside, lock)
    except FileExistsError:
        pass
    aside.unlink()
    return False


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _prefix() -> str:
    rank = os.environ.get("RANK")
    return f"op-lock (rank {rank})" if rank is not None else "op-lock"


WAITING_LOAD_GOES_ON = (
    "the waiting load continues (if the op was never built, the run stops and asks for a rerun)"
)


def removed_message(status: LockStatus, then: str = WAITING_LOAD_GOES_ON) -> str:
    """The line printed after removing a stale lock; `then` says what happens next."""
    pids = " ".join(map(str, status.builders))
    orphans = f" (its orphaned compile processes, pids {pids}, finish on their own)" if pids else ""
    return f"{_prefix()}: removed stale lock {status.path} left by a killed build{orphans}; {then}"


def clear_stale_locks(
    root: Path,
    *,
    stale_after_s: float = STALE_AFTER_S,
    poll_s: float = POLL_S,
    emit: Emit = _stderr,
) -> list[Path]:
    """The check before DeepSpeed starts: remove every lock under `root` that no live
    process holds. A holder-less lock younger than `stale_after_s` is watched until it ages
    (at most that long), vanishes or gains a holder. Live locks are left alone. Returns the
    locks removed."""
    removed: list[Path] = []
    pending = find_baton_locks(root)
    said: set[Path] = set()
    while pending:
        still: list[Path] = []
        for lock in pending:
            status = inspect_lock(lock)
            if status is None or status.holders or status.foreign:
                continue
            if status.is_stale(stale_after_s):
                if remove_if_unchanged(lock, status.ident):
                    emit(removed_message(status, "this run builds the op when it needs it"))
                    removed.append(lock)
                continue
            if lock not in said:
                emit(
                    f"{_prefix()}: {lock} has no live holder ({status.age_s:.0f} s old);"
                    f" removing it in {stale_after_s - status.age_s:.0f} s unless a build"
                    " takes it up"
                )
                said.add(lock)
            still.append(lock)
        pending = still
        if pending:
            time.sleep(poll_s)
    return removed


class LockWatchdog(threading.Thread):
    """Daemon thread: reports the baton locks this process may be waiting on, once every
    `report_every_s`, and removes those whose holder died (`stale_after_s` old and
    holder-less on two looks `poll_s` apart)."""

    def __init__(
        self,
        root: Path,
        *,
        stale_after_s: float = STALE_AFTER_S,
        report_every_s: float = REPORT_EVERY_S,
        poll_s: float = POLL_S,
        emit: Emit = _stderr,
    ) -> None:
        super().__init__(name="op-lock-watchdog", daemon=True)
        self.root = root
        self.stale_after_s = stale_after_s
        self.report_every_s = report_every_s
        self.poll_s = poll_s
        self.emit = emit
        self.removed: list[Path] = []  # stale locks this thread removed
        self.judged_stale: set[Path] = set()  # removed here, or seen holder-less then gone
        self.vanished: set[Path] = set()  # locks held by others that went while watched
        self._stop_event = threading.Event()
        self._first_seen: dict[Path, float] = {}
        self._last_report: dict[Path, float] = {}
        self._orphan: dict[Path, tuple[tuple[int, int, int], float]] = {}
        self._orphaned: set[Path] = set()  # seen with no live holder at some look
        self._mine: set[Path] = set()  # held by this process at some look

    def stop(self) -> None:
        """Ask the thread to end, wait for it, then take one last look (so a lock that
        went just now is known to have gone)."""
        if self._stop_event.is_set():
            return
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)
        self.check_once()

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            try:
                self.check_once()
            except Exception as err:  # never take the run down from here
                self.emit(f"{_prefix()}: watchdog error {type(err).__name__}: {err}")

    def _forget(self, lock: Path) -> None:
        for table in (self._first_seen, self._last_report, self._orphan):
            table.pop(lock, None)
        self._orphaned.discard(lock)
        self._mine.discard(lock)

    def check_once(self, now: float | None = None) -> None:
        """One look at every lock under the root."""
        now = time.time() if now is None else now
        locks = find_baton_locks(self.root)
        for gone in set(self._first_seen) - set(locks):
            if gone in self._orphaned:  # had no holder, then went: a peer removed it
                self.judged_stale.add(gone)
            if gone not in self._mine:
                self.vanished.add(gone)
            self._forget(gone)
        for lock in locks:
            status = inspect_lock(lock, now)
            if status is None:
                continue
            first = self._first_seen.setdefault(lock, now)
            if os.getpid() in status.holders:
                self._mine.add(lock)
            if not status.holders and not status.foreign:
                self._orphaned.add(lock)
            if status.is_stale(self.stale_after_s):
                seen = self._orphan.get(lock)
                if seen is None or seen[0] != status.ident:
                    self._orphan[lock] = (status.ident, now)
                elif now - seen[1] >= self.poll_s * 0.9:
                    self.judged_stale.add(lock)
                    self.vanished.add(lock)
                    if remove_if_unchanged(lock, status.ident):
                        self.removed.append(lock)
                        self.emit(removed_message(status))
                    self._forget(lock)
                    continue
            else:
                self._orphan.pop(lock, None)
            last = self._last_report.get(lock, first)
            if now - last >= self.report_every_s:
                self._last_report[lock] = now
                waited = f"({now - first:.0f} s so far)"
                if os.getpid() in status.holders:  # this process has the baton: it builds
                    self.emit(f"{_prefix()}: building {status.op} {waited}")
                else:
                    self.emit(f"{_prefix()}: waiting on {lock} {describe_holder(status)} {waited}")


def interrupted_message(op: str, stale: bool) -> str:
    """The one line that ends a run whose op load failed after the build it waited for
    went away unfinished."""
    why = (
        "a killed run left its build lock, which was removed as stale"
        if stale
        else "the build this run waited for ended without it (failed or killed)"
    )
    return f"DeepSpeed op {op} was not built: {why}; rerun the same command to build it"


def _unbuilt_op(err: BaseException, watchdog: LockWatchdog) -> tuple[str, bool] | None:
    """(op, removed as stale) when `err` is the failed load of an op whose lock this process
    waited on and saw go; else None."""
    text = str(err)
    for lock in sorted(watchdog.vanished | watchdog.judged_stale):
        op = lock.parent.name
        if f"{op}.so" in text or f"{op}_v" in text:
            return op, lock in watchdog.judged_stale
    return None


@contextmanager
def watch_op_builds(
    root: Path | None = None,
    *,
    stale_after_s: float = STALE_AFTER_S,
    report_every_s: float = REPORT_EVERY_S,
    poll_s: float = POLL_S,
    emit: Emit = _stderr,
) -> Iterator[LockWatchdog]:
    """Around code that may JIT-build DeepSpeed ops: clear stale locks first, watch while
    the body runs, and turn the load error that follows an unfinished build into
    `OpBuildInterrupted` (one line under the launcher's error contract)."""
    root = extensions_root() if root is None else root
    clear_stale_locks(root, stale_after_s=stale_after_s, poll_s=poll_s, emit=emit)
    watchdog = LockWatchdog(
        root,
        stale_after_s=stale_after_s,
        report_every_s=report_every_s,
        poll_s=poll_s,
        emit=emit,
    )
    watchdog.start()
    try:
        yield watchdog
    except (ImportError, OSError) as err:
        watchdog.stop()
        unbuilt = _unbuilt_op(err, watchdog)
        if unbuilt is not None:
            raise OpBuildInterrupted(interrupted_message(*unbuilt)) from err
        raise
    finally:
        watchdog.stop()
