"""`rl.cli.exit_process`: a clean run leaves through os._exit with its output flushed; a
failed one keeps its exit code and runs its atexit handlers, and skips the interpreter's
teardown while a process group is still up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_exit(code: int, setup: str = "") -> subprocess.CompletedProcess[str]:
    script = (
        f"{setup}import sys; from rl.cli import exit_process; "
        "print('out', end=''); print('err', end='', file=sys.stderr); "
        "import atexit; atexit.register(lambda: print('atexit ran', end='')); "
        f"exit_process({code})"
    )
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_exit_process_clean_run_flushes_and_skips_teardown():
    proc = run_exit(0)
    assert proc.returncode == 0
    assert proc.stdout == "out"  # buffered output written, atexit handlers not run
    assert proc.stderr == "err"


@pytest.mark.parametrize("code", [1, 2])
def test_exit_process_failure_keeps_code_and_normal_exit(code: int):
    proc = run_exit(code)
    assert proc.returncode == code
    assert proc.stdout == "outatexit ran"


GLOO_GROUP = (
    "import tempfile, torch.distributed as dist; "
    "dist.init_process_group('gloo', init_method='file://' + tempfile.mktemp(), "
    "rank=0, world_size=1); "
    "Teardown = type('Teardown', (), {'__del__': lambda self: print('teardown', end='')}); "
    "marker = Teardown(); "
)
"""A one-rank gloo group left up (as a user error raised mid-run leaves it), and an object
whose finaliser prints when the interpreter tears down."""


@pytest.mark.parametrize("code", [1, 2])
def test_exit_process_failure_with_a_process_group_up_skips_teardown(code: int):
    proc = run_exit(code, setup=GLOO_GROUP)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "outatexit ran"  # atexit handlers ran, the teardown did not
    assert proc.stderr.endswith("err")
