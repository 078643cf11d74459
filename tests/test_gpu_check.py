"""scripts/gpu_check.sh --dry-run: exits 0 without a GPU, lists every case, and every
training command it would run names a config and overrides that load (so a typo in the
script fails here, on a CPU, not on a lent GPU machine); its rows merge into the summary;
and its real path runs on 2 CPU ranks behind a fake nvidia-smi (the PPO kill-and-resume
case)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from rl.config import load_config
from tests.launcher import REPO

CASES = {
    "zero2-transformers", "zero3-transformers", "zero2-vllm-sleep", "zero3-vllm-sleep",
    "zero3-offload", "implicit-prm", "pav-verifier", "pav", "ppo", "chat-bf16-vllm",
    "random-model", "throughput", "chat-bf16-transformers", "ppo-resume",
}  # fmt: skip


def plan(gpus: int, **env: str) -> dict[str, list[str]]:
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"GPUS": str(gpus), "PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "dry run: nothing was run" in proc.stdout
    cases = {}
    for line in proc.stdout.splitlines():
        if line.startswith("== "):
            name, command = line[3:].split(": ", 1)
            cases[name] = shlex.split(command)
    return cases


def test_dry_run_lists_every_case_with_loadable_configs() -> None:
    for gpus in (1, 8):
        cases = plan(gpus)
        assert set(cases) == CASES
        for name, argv in cases.items():
            if "--config" not in argv:
                continue
            at = argv.index("--config")
            config, overrides = argv[at + 1], argv[at + 2 :]
            cfg = load_config(REPO / config, overrides)  # ConfigError on any bad key
            assert cfg.rollout.prompts_per_step % gpus == 0, name
            if name == "ppo-resume":  # the shell function that kills and resumes the run
                assert argv[0] == "kill_and_resume" and cfg.trainer.save_every == 2
                argv = argv[1:]
            assert argv[:3] == [".venv/bin/deepspeed", "--num_gpus", str(gpus)], name


def test_a_given_interpreter_and_a_subset_of_cases() -> None:
    """PYTHON: an interpreter that has the stack (no setup, the launcher by module);
    CASES: only the cases named."""
    cases = plan(1, PYTHON="python3", CASES="zero3-transformers,throughput")
    assert set(cases) == {"zero3-transformers", "throughput"}
    launcher = ["python3", "-m", "deepspeed.launcher.runner", "--num_gpus", "1"]
    assert cases["zero3-transformers"][:5] == launcher
    assert cases["throughput"][:2] == ["python3", "benchmarks/throughput.py"]


def test_without_a_gpu_it_refuses_to_run() -> None:
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True,
        timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 1 and "no NVIDIA GPU found" in proc.stderr


def test_merge_rows_replaces_the_cases_run_and_keeps_the_rest() -> None:
    from benchmarks.gpu_check_rows import HEADER, MARKER, merge_rows

    old = "| ppo | ok | 9 s | | a, 2026-01-01, 1x H200 |"
    kept = "| zero2-transformers | ok | 49 s | | a, 2026-01-01, 1x H200 |"
    new = "| ppo | FAILED (exit 1) | 3 s | | b, 2026-02-02, 8x H100 |"
    summary = "\n".join(["# GPU check", "", "Notes.", "", MARKER, "", *HEADER, old, kept])
    merged = merge_rows(summary + "\n\nAfter the table.\n", [new])
    assert merged == "\n".join(
        ["# GPU check", "", "Notes.", "", MARKER, "", *HEADER, kept, new, "", "After the table."]
    ) + "\n"  # fmt: skip
    assert merge_rows("", [new]) == "\n".join([MARKER, "", *HEADER, new]) + "\n"
    assert merge_rows("# Title\n", [new]).startswith("# Title\n\n" + MARKER)


FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  -L) echo "GPU 0: Fake GPU (UUID: 0)"; echo "GPU 1: Fake GPU (UUID: 1)";;
  *memory.total*) echo "Fake GPU, 1 MiB, 0";;
  *) echo "Fake GPU";;
esac
"""


@pytest.mark.e2e
def test_ppo_kill_and_resume_case_runs_and_merges_its_rows(
    tmp_path: Path, model_cache: Path
) -> None:
    """The script's real path on 2 CPU ranks (a fake nvidia-smi that lists 2 GPUs): the PPO
    case, then the one killed after step 3 and resumed, equal to it; their rows replace the
    earlier PPO row of summary.md and keep the rest."""
    import sys

    from benchmarks.gpu_check_rows import HEADER, MARKER
    from tests.launcher import FAST_OVERRIDES, run_env

    bindir, out = tmp_path / "bin", tmp_path / "out"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bindir / "nvidia-smi").chmod(0o755)
    out.mkdir()
    other = "| zero3-transformers | ok | 51 s | | a, 2026-01-01, 1x H200 |"
    old_ppo = "| ppo | ok | 9 s | | a, 2026-01-01, 1x H200 |"
    (out / "summary.md").write_text("\n".join(["# Kept", "", MARKER, "", *HEADER, other, old_ppo]))
    small = [o for o in FAST_OVERRIDES if not o.startswith(("reward.", "trainer.max_steps"))]
    env = run_env(
        {
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "PYTHON": sys.executable,
            "CASES": "ppo,ppo-resume",
            "OUT": str(out),
            "RUNS": str(tmp_path / "runs"),
            "EXTRA": " ".join([*small, f"model.cache_dir={model_cache}"]),
        }
    )
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in (out / "logs" / "ppo-resume.log").read_text()
    lines = (out / "summary.md").read_text().splitlines()
    assert lines[:4] == ["# Kept", "", MARKER, ""] and other in lines and old_ppo not in lines
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ppo")}
    assert set(rows) == {"ppo", "ppo-resume"}
    assert "| ok |" in rows["ppo"] and "2x Fake GPU |" in rows["ppo"]
    assert "against ppo: max rel. diff 0 over" in rows["ppo-resume"], rows["ppo-resume"]
