"""Fault injection under `deepspeed --num_gpus 2` on the fast quickstart (issue 38). Each test
injects one fault and prints one `FAULT` line with what it measured; `scripts/faults.sh` runs
this module and shows the lines.

Faults: a SIGTERM at a random step (plus a second one during the save), one rank stopped
(SIGSTOP) and one killed (SIGKILL), a NaN loss, a reward function that never returns (and
one that raises, under `reward.on_error=zero`), a truncated newest checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
from pathlib import Path

import pytest

from rl.engine.checkpoint import COMPLETE, damage, tag_for
from tests.launcher import (
    FAST_OVERRIDES,
    assert_same_weights,
    compared_keys,
    launch,
    rank_processes,
    read_metrics,
    start,
)

pytestmark = pytest.mark.e2e


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """One result line on the terminal, whatever pytest's capture setting."""
    with capsys.disabled():
        print(f"\nFAULT {line}", flush=True)


def overrides(out: Path, model_cache: Path, *extra: str) -> list[str]:
    return [*FAST_OVERRIDES, f"output_dir={out}", f"model.cache_dir={model_cache}", *extra]


def wait_for_step(out: Path, step: int, proc, timeout: float = 400) -> float:  # type: ignore[no-untyped-def]
    """Block until metrics.jsonl has a row for `step`; returns the monotonic time then."""
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and any(
            json.loads(line).get("step") == step for line in path.read_text().splitlines() if line
        ):
            return time.monotonic()
        assert proc.poll() is None, f"run ended (exit {proc.returncode}) before step {step}"
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


def equal_values(want_dir: Path, got_dir: Path) -> tuple[int, int]:
    """(equal, total) compared metric values of two runs (all keys but timings and memory)."""
    want_rows, got_rows = read_metrics(want_dir), read_metrics(got_dir)
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
    equal = total = 0
    for want, got in zip(want_rows, got_rows, strict=True):
        assert compared_keys(want) == compared_keys(got)
        for key in compared_keys(want):
            total += 1
            equal += got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7)
    return equal, total


def error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(("error", "warning"))]
    assert lines, text[-3000:]
    return lines[0]


def test_sigterm_checkpoints_and_resumes_exactly(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["trainer.max_steps=6", "trainer.save_every=0"]  # no periodic save due
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = launch(overrides(full, model_cache, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    k = random.Random().randint(1, 3)
    log = tmp_path / "cut.log"
    job = start(
        overrides(cut, model_cache, *common), log, env={"DENSE_RL_SIGNAL_DURING_SAVE": "SIGTERM"}
    )
    wait_for_step(cut, k, job)
    signalled = time.monotonic()
    for rank in rank_processes(job):  # what the launcher forwards a scheduler's SIGTERM to
        rank.send_signal(signal.SIGTERM)
    code = job.wait(timeout=120)
    seconds = time.monotonic() - signalled
    text = log.read_text()
    assert code == 0, text[-3000:]
    match = re.search(r"preempted \(SIGTERM\) at step (\d+): complete checkpoint (\S+);", text)
    assert match, text[-3000:]
    step = int(match.group(1))
    assert "SIGTERM again during the checkpoint save" in text
    ckpt = cut / "checkpoints" / tag_for(step)
    assert (ckpt / COMPLETE).is_file() and damage(ckpt) is None
    assert not (cut / "final").exists()
    proc = launch(overrides(cut, model_cache, *common, "trainer.resume=auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in proc.stdout + proc.stderr
    equal, total = equal_values(full, cut)
    assert equal == total
    assert_same_weights(full / "final", cut / "final")
    report(
        capsys,
        f"sigterm: signal after step {k}, exit {code} in {seconds:.1f} s, checkpoint "
        f"at step {step} (second SIGTERM during the save), resume=auto: {equal} of "
        f"{total} metric values equal to the uninterrupted run, final weights equal",
    )


def test_stopped_rank_ends_the_job_and_resume_continues(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    common = ["trainer.max_steps=4", "trainer.save_every=1", "trainer.collective_timeout_s=60"]
    log = tmp_path / "stop.log"
    job = start(overrides(out, model_cache, *common), log, env={"DENSE_RL_STOP_AT_STEP": "2"})
    stopped = wait_for_step(out, 2, job)
    ranks = rank_processes(job)
    code = job.wait(timeout=300)
    seconds = time.monotonic() - stopped
    alive = [r.pid for r in ranks if r.is_running() and r.status() != "zombie"]
    text = log.read_text()
    line = error_line(text)
    assert code != 0 and not alive, (code, alive)
    assert "rank 1 stopped answering" in line, line
    # the timeout, then the deepspeed launcher's 30 s grace for the stopped rank's SIGTERM
    assert seconds < 60 + 45, seconds
    proc = launch(overrides(out, model_cache, *common, "trainer.resume=auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", proc.stdout + proc.stderr)
    assert resumed and int(resumed.group(1)) == 2
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4]
    report(
        capsys,
        f"sigstop rank 1 after step 2, collective_timeout_s=60: every process gone "
        f"{seconds:.0f} s later (launcher exit {code}); {line!r}; resume=auto went "
        f"on from step {resumed.group(1)} to 4",
    )


def test_killed_rank_ends_the_job_in_seconds(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    job = start(overrides(out, model_cache, "trainer.max_steps=6"), tmp_path / "kill.log")
    wait_for_step(out, 1, job)
    ranks = rank_processes(job)
    killed = time.monotonic()
    ranks[1].send_signal(signal.SIGKILL)
    code = job.wait(timeout=120)
    seconds = time.monotonic() - killed
    assert code != 0 and seconds < 15, (code, seconds)
    assert not any(r.is_running() and r.status() != "zombie" for r in ranks)
    report(
        capsys,
        f"sigkill rank 1 after step 1: every process gone {seconds:.1f} s later "
        f"(launcher exit {code})",
    )


def test_nan_loss_is_skipped_on_every_rank(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    common = ["trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_checkpoints=0"]
    proc = launch(overrides(out, model_cache, *common), env={"DENSE_RL_NAN_AT_STEP": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["step"]: r for r in read_metrics(out)}
    assert [rows[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    raw = (out / "metrics.jsonl").read_text()
    assert '"train/loss": "NaN"' in raw and "null" not in raw
    assert "step 2: skipped 1 optimizer step(s)" in proc.stdout + proc.stderr
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert saved == [tag_for(1), tag_for(3), tag_for(4)]  # none at the skipped step
    assert (out / "final").is_dir()

    halted = tmp_path / "halted"
    proc = launch(
        overrides(halted, model_cache, *common, "trainer.max_skipped_steps=2"),
        env={"DENSE_RL_NAN_AT_STEP": "2,3"},
    )
    line = error_line(proc.stderr)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert line.startswith("error: step 3: 2 optimizer steps in a row skipped"), line
    assert not (halted / "final").exists()
    assert sorted(p.name for p in (halted / "checkpoints").glob("step_*")) == [tag_for(1)]
    report(
        capsys,
        "nan loss on rank 1 at step 2: 1 optimizer step skipped on every rank, run "
        "completed (exit 0, no checkpoint at step 2); NaN at steps 2-3 with "
        f"max_skipped_steps=2: exit {proc.returncode}, {line!r}, newest checkpoint "
        "step 1, no final model",
    )


def test_hanging_reward_function_times_out(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hang = ["reward.functions=[{fn: arith}, {fn: 'tests.reward_fns:sleep_forever'}]"]
    started = time.monotonic()
    proc = launch(overrides(tmp_path / "raise", model_cache, *hang, "reward.timeout_s=5"))
    seconds = time.monotonic() - started
    line, code = error_line(proc.stderr), proc.returncode
    assert code == 2, proc.stderr[-3000:]
    assert re.match(
        r"error: reward function 'tests.reward_fns:sleep_forever' timed out after 5 s "
        r"\(reward.timeout_s\) on rows 0-\d+ \(evaluation at step 0, rank \d\)",
        line,
    ), line
    out = tmp_path / "zero"
    fails = ["reward.functions=[{fn: arith}, {fn: 'tests.reward_fns:fails_on_odd_length'}]"]
    proc = launch(
        overrides(out, model_cache, *fails, "reward.on_error=zero", "trainer.max_steps=2")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [r["reward/errors"] for r in read_metrics(out) if "reward/errors" in r]
    assert len(errors) == 2 and sum(errors) > 0, errors
    assert "warning: reward function 'tests.reward_fns:fails_on_odd_length' raised" in proc.stderr
    report(
        capsys,
        f"reward function sleeping forever, timeout_s=5: exit {code} "
        f"after {seconds:.0f} s in all, {line!r}; a raising one with on_error=zero: "
        f"run completed, reward/errors per step {errors}",
    )


def test_truncated_newest_checkpoint_resumes_from_previous(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    common = ["trainer.save_every=1", "trainer.keep_checkpoints=2"]
    proc = launch(overrides(out, model_cache, *common, "trainer.max_steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = out / "checkpoints" / tag_for(3)
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = launch(
        overrides(out, model_cache, *common, "trainer.max_steps=4", "trainer.resume=auto")
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    warning = error_line(proc.stderr)
    assert warning.startswith(f"warning: skipping damaged checkpoint {tag_for(3)}: {victim} is")
    assert f"resumed from {out / 'checkpoints' / tag_for(2)} at step 2" in text
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert tag_for(4) in kept
    report(
        capsys,
        f"truncated {victim.relative_to(out)} to half: {warning!r}; resumed from "
        f"step 2, ran to 4 (exit {proc.returncode}); kept {kept}",
    )
