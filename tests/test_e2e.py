"""End-to-end runs of launch/train_rl.py under the real launchers (deepspeed, torchrun, python).

Each run uses a tiny variant of the quickstart (see tests/launcher.py) so the suite stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.launcher import (
    FAST_OVERRIDES,
    assert_resumed_matches,
    assert_same_metrics,
    check_ok,
    launch,
    read_metrics,
)

pytestmark = pytest.mark.e2e

STEP_KEYS = {
    "step",
    "samples",
    "reward/outcome_mean",
    "time/step_s",
    "time/rollout_s",
    "time/reward_s",
    "time/update_s",
    "train/loss",
    "train/entropy",
    "train/grad_norm",
    "data/skipped_long_prompts",
}


OFF_POLICY_RATIO_MARGIN = 1e-3
"""|train/ratio - 1| above this: updates on a policy that has moved. Measured 0.004-0.025
with 2 epochs x 2 mini-batches; with the old-policy log-probs dropped (every update then
on-policy) rounding alone gave at most 2.3e-8."""


def overrides(out: Path, cache: Path, *extra: str) -> list[str]:
    return [*FAST_OVERRIDES, f"output_dir={out}", f"model.cache_dir={cache}", *extra]


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def start_model_dir(cache: Path) -> Path:
    (found,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith("arith-tiny-")]
    return found


@pytest.mark.parametrize(
    "stage, extra",
    [
        (2, ["algo.epochs=2", "algo.mini_batches=2", "algo.advantage=rloo"]),
        # zero.Init loading, generation on the gathered model, the reference offloaded
        (3, ["algo.kl_coef=0.05", "model.offload_references=true"]),
        (2, ["deepspeed.config=configs/deepspeed/zero2_offload.json"]),  # DeepSpeed CPU Adam
    ],
)
def test_deepspeed_two_ranks(stage: int, extra: list[str], tmp_path: Path, model_cache: Path):
    out = tmp_path / "run"
    proc = launch(overrides(out, model_cache, f"deepspeed.zero_stage={stage}", *extra))
    check_ok(proc)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    for row in rows[1:]:
        assert STEP_KEYS <= set(row), STEP_KEYS - set(row)
        assert row["samples"] == row["step"] * 4 * 4  # prompts_per_step x group_size
        assert math.isfinite(row["train/loss"])
    if "algo.epochs=2" in extra:
        # two epochs x two mini-batches: the 2nd to 4th updates see a moved policy (the
        # step's mean over 4 updates; measured clip_frac 0.06-0.12, 0 when on-policy)
        for row in rows[1:]:
            assert abs(row["train/ratio"] - 1.0) > OFF_POLICY_RATIO_MARGIN, row["train/ratio"]
            assert row["train/clip_frac"] > 0.01, row["train/clip_frac"]
    else:  # one epoch, one mini-batch: the update is exactly on-policy
        for row in rows[1:]:
            assert row["train/ratio"] == pytest.approx(1.0, abs=1e-6), row["train/ratio"]
            assert row["train/clip_frac"] == 0.0
    if "algo.kl_coef=0.05" in extra:
        # step 1 updates the policy the reference is a copy of: no divergence yet
        assert rows[1]["train/kl"] < 1e-6, rows[1]["train/kl"]
        assert all(r["train/kl"] >= 0 for r in rows[1:])
        assert all(r["train/kl"] > 1e-6 for r in rows[2:])  # the policy moved away from it
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    start = final_weights(start_model_dir(model_cache))
    final = final_weights(out / "final")
    assert start.keys() == final.keys()
    assert any(not torch.equal(start[k], final[k]) for k in start), "training changed nothing"


def test_resume_matches_uninterrupted_run(tmp_path: Path, model_cache: Path):
    common = ["trainer.max_steps=4", "trainer.save_every=2", "data.eval_size=8"]
    full = tmp_path / "full"
    check_ok(launch(overrides(full, model_cache, *common)))

    killed = tmp_path / "killed"
    proc = launch(overrides(killed, model_cache, *common), env={"DENSE_RL_KILL_AFTER_STEP": "3"})
    assert proc.returncode != 0
    assert [r["step"] for r in read_metrics(killed)] == [0, 1, 2, 3]  # step 3 not saved
    assert (killed / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert not (killed / "checkpoints" / "step_00000004").exists()

    proc = launch(overrides(killed, model_cache, *common, "trainer.resume=auto"))
    check_ok(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    assert_resumed_matches(full, killed)


def test_single_process_and_torchrun(tmp_path: Path, model_cache: Path):
    single = tmp_path / "single"
    proc = launch(
        overrides(single, model_cache, "trainer.max_steps=1"),
        launcher="python",
        env={"WANDB_MODE": "offline"},
    )
    check_ok(proc)
    assert [r["step"] for r in read_metrics(single)] == [0, 1]
    assert list((single / "wandb").glob("offline-run-*")), "wandb offline run not written"

    both = tmp_path / "torchrun"
    check_ok(launch(overrides(both, model_cache, "trainer.max_steps=1"), launcher="torchrun"))
    assert [r["step"] for r in read_metrics(both)] == [0, 1]
    # torchrun's 2 ranks are the same job as deepspeed's: the same seed gives the same
    # rollouts, losses and evaluation. (The single process is a different job: one rank
    # samples every prompt with rank 0's seed, where 2 ranks split them, each with its own.)
    deepspeed = tmp_path / "deepspeed"
    check_ok(launch(overrides(deepspeed, model_cache, "trainer.max_steps=1")))
    assert_same_metrics(deepspeed, both, must_have={"train/loss", "eval/accuracy"})
