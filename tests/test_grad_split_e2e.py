"""The gradient of one update is the global-batch gradient whether the batch is split over
2 ranks x 2 micro-batches (real deepspeed launcher, gloo) or 1 rank x 4 micro-batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launcher import REPO, free_port, run_env

pytestmark = pytest.mark.e2e

CHECK = REPO / "tests" / "dist_grad_check.py"


def run_check(out: Path, ranks: int, cache: Path, agg: str) -> list[dict]:
    overrides = [
        f"model.cache_dir={cache}",
        "model.tiny.hidden_size=64",
        "model.tiny.num_heads=2",
        "model.tiny.num_layers=2",
        "model.tiny.intermediate_size=128",
        "model.tiny.sft_steps=60",
        "data.train_size=64",
        "data.eval_size=8",
        "deepspeed.config=configs/deepspeed/zero0.json",
        "optim.max_grad_norm=0",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "trainer.micro_batch_size=2",
        f"algo.loss_agg={agg}",
        f"output_dir={out}",
    ]
    if ranks > 1:
        bindir = Path(sys.executable).parent
        cmd = [str(bindir / "deepspeed"), "--num_gpus", str(ranks)]
        cmd += ["--master_port", str(free_port()), str(CHECK)]
    else:
        cmd = [sys.executable, str(CHECK)]
    proc = subprocess.run(
        [*cmd, str(out), *overrides], cwd=REPO, env=run_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"grad_check_rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_gradient_independent_of_split(agg: str, tmp_path: Path, model_cache: Path):
    for ranks, accum in ((2, 2), (1, 4)):
        results = run_check(tmp_path / f"r{ranks}", ranks, model_cache, agg)
        for result in results:
            assert result["world_size"] == ranks
            assert result["grad_accum_steps"] == accum
            assert result["n_captured"] == result["n_params"] > 0
            assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["max_grad"]), result
