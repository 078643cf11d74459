"""scripts/gpu_check.sh --dry-run: exits 0 without a GPU, lists every case, and every
training command it would run names a config and overrides that load (so a typo in the
script fails here, on a CPU, not on a lent GPU machine)."""

from __future__ import annotations

import shlex
import subprocess

from rl.config import load_config
from tests.launcher import REPO

CASES = {
    "zero2-transformers", "zero3-transformers", "zero2-vllm-sleep", "zero3-vllm-sleep",
    "zero3-offload", "implicit-prm", "pav-verifier", "pav", "ppo", "chat-bf16-vllm",
    "random-model", "throughput", "chat-bf16-transformers",
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
