"""Helpers for end-to-end tests that run launch/train_rl.py under the real launchers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train_rl.py"
TRAIN_PAV = REPO / "launch" / "train_pav.py"

# A small, fast variant of the quickstart: tiny model, short SFT, few prompts.
FAST_OVERRIDES = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_heads=2",  # head_dim 32: vLLM CPU attention rejects head_dim 16
    "model.tiny.num_layers=2",
    "model.tiny.intermediate_size=128",
    "model.tiny.sft_steps=60",
    "data.train_size=256",
    "data.eval_size=8",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=3",
    "optim.lr=1e-3",
    "reward.functions=[{fn: arith}, {fn: 'tests.reward_fns:digit_fraction', weight: 0.5}]",
    "logging.progress_bar=false",
]


# The same scale for configs/quickstart_chat.yaml (builtin:chat-tiny, GSM8K-style JSONL).
CHAT_FAST_OVERRIDES = [
    *FAST_OVERRIDES[:5],  # the same tiny model and SFT length
    "data.train_size=64",
    "data.eval_size=8",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=40",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=2",
    "trainer.eval_every=0",
    "optim.lr=1e-3",
    "logging.progress_bar=false",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    # scripts under tests/ import `tests.reward_fns` (user-style reward functions)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def launch_command(
    overrides: list[str],
    *,
    launcher: str = "deepspeed",
    ranks: int = 2,
    config: str = "configs/quickstart.yaml",
    script: Path = TRAIN,
) -> list[str]:
    """The command line that runs `script` under `launcher` with `overrides`."""
    bindir = Path(sys.executable).parent
    if launcher == "deepspeed":
        cmd = [str(bindir / "deepspeed"), "--num_gpus", str(ranks)]
        cmd += ["--master_port", str(free_port()), str(script)]
    elif launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), "--nproc_per_node", str(ranks)]
        cmd += ["--master_port", str(free_port()), str(script)]
    else:
        cmd = [sys.executable, str(script)]
    return [*cmd, "--config", config, *overrides]


def start(
    overrides: list[str], log: Path, *, env: dict[str, str] | None = None, ranks: int = 2
) -> subprocess.Popen[bytes]:
    """Start a 2-rank deepspeed job in the background, stdout and stderr into `log`, in a
    session of its own (so a test can signal it the way a scheduler would)."""
    handle = open(log, "wb")
    return subprocess.Popen(
        launch_command(overrides, ranks=ranks),
        cwd=REPO,
        env=run_env(env),
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def rank_processes(proc: subprocess.Popen[bytes]) -> list[Any]:
    """The training processes (ranks) under a launcher started by `start`, rank order."""
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    ranks = [c for c in children if any("train_rl.py" in a for a in c.cmdline()[:3])]
    return sorted(ranks, key=lambda c: c.pid)


def launch(
    overrides: list[str],
    *,
    launcher: str = "deepspeed",
    ranks: int = 2,
    config: str = "configs/quickstart.yaml",
    env: dict[str, str] | None = None,
    timeout: int = 600,
    script: Path = TRAIN,
) -> subprocess.CompletedProcess[str]:
    """Run a training job (`script`: launch/train_rl.py by default); returns the finished
    process (output captured as text)."""
    cmd = launch_command(overrides, launcher=launcher, ranks=ranks, config=config, script=script)
    return subprocess.run(
        cmd, cwd=REPO, env=run_env(env), capture_output=True, text=True, timeout=timeout
    )


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics rows, non-finite values (written as marked strings) as floats."""
    from rl.trainer.metrics import read_metrics_file

    return read_metrics_file(output_dir / "metrics.jsonl")


def check_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )


def saved_tensors(directory: Path) -> dict[str, Any]:
    """Every tensor of the `*.safetensors` files in `directory` (a Hugging Face save), and of
    its `*.pt` tensor dicts (a value model's head), keyed `<file>:<name>`."""
    import torch
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors in {directory}"
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    for file in sorted(directory.glob("*.pt")):
        tensors.update({f"{file.name}:{k}": v for k, v in torch.load(file).items()})
    return tensors


def assert_same_weights(want_dir: Path, got_dir: Path) -> None:
    """Both Hugging Face saves hold the same tensors (names, shapes, values within rel 1e-5:
    the metrics' tolerance; one optimizer step at the tests' lr moves them far more)."""
    import torch

    want, got = saved_tensors(want_dir), saved_tensors(got_dir)
    assert want.keys() == got.keys(), set(want) ^ set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def compared_keys(row: dict[str, Any]) -> set[str]:
    """A metrics row's keys that must replay exactly: all but timings and memory."""
    return {k for k in row if not k.startswith(("time/", "mem/"))}


def assert_same_metrics(
    want_dir: Path, got_dir: Path, must_have: set[str] | frozenset[str] = frozenset()
) -> None:
    """Two runs logged the same steps with the same values (all keys but timings and memory,
    rel 1e-5, as `assert_resumed_matches`); `must_have` keys must be among those compared."""
    import pytest

    want_rows, got_rows = read_metrics(want_dir), read_metrics(got_dir)
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
    seen: set[str] = set()
    for want, got in zip(want_rows, got_rows, strict=True):
        keys = compared_keys(want)
        assert keys == compared_keys(got), keys ^ compared_keys(got)
        seen |= keys
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
    assert set(must_have) <= seen, set(must_have) - seen


def assert_resumed_matches(
    full: Path,
    resumed: Path,
    must_have: set[str] | frozenset[str] = frozenset(),
    weights: tuple[str, ...] = ("final",),
) -> None:
    """A resumed run's metrics equal the uninterrupted run's from step 3 on (all keys but
    timings and memory, rel 1e-5); `must_have` keys must be among those compared. The final
    models in each of the `weights` folders (Hugging Face saves under the run directories)
    are the same too."""
    import pytest

    expected, got_rows = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in got_rows] == [0, 1, 2, 3, 4]
    for want, got in zip(expected[3:], got_rows[3:], strict=True):
        keys = {k for k in want if not k.startswith(("time/", "mem/"))}
        assert keys == {k for k in got if not k.startswith(("time/", "mem/"))}
        assert set(must_have) <= keys, set(must_have) - keys
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    for folder in weights:
        assert_same_weights(full / folder, resumed / folder)
