"""PPO with a critic (algo.credit=gae) end to end under the real launcher: ZeRO-3 on 2 ranks
with the online implicit PRM's dense rewards, KL in the reward and critic warm-up; and resume
with the critic's weights and optimizer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.launcher import FAST_OVERRIDES, assert_resumed_matches, check_ok, launch, read_metrics
from tests.test_e2e import final_weights, start_model_dir

pytestmark = pytest.mark.e2e

IMPLICIT_PRM = "reward.heads=[{head: implicit_prm, kwargs: {lr: 1.0e-3}}]"
PPO = ["algo.credit=gae", "critic.lr=1.0e-3"]
CRITIC_KEYS = {
    "critic/value_loss",
    "critic/value_clip_frac",
    "critic/values_mean",
    "critic/returns_mean",
    "critic/explained_variance",
    "critic/grad_norm",
}


def overrides(out: Path, cache: Path, *extra: str) -> list[str]:
    return [*FAST_OVERRIDES, f"output_dir={out}", f"model.cache_dir={cache}", *PPO, *extra]


def test_ppo_critic_zero3_two_ranks(tmp_path: Path, model_cache: Path):
    out = tmp_path / "run"
    extra = [
        IMPLICIT_PRM,
        "deepspeed.zero_stage=3",
        "algo.kl_coef=0.05",
        "algo.kl_mode=reward",
        "algo.epochs=2",
        "algo.mini_batches=2",
        "critic.warmup_steps=1",
        "critic.value_clip=0.001",
    ]
    check_ok(launch(overrides(out, model_cache, *extra)))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert CRITIC_KEYS <= set(row), CRITIC_KEYS - set(row)
        for key in CRITIC_KEYS:
            assert math.isfinite(row[key]), key
    # step 1 is the critic's warm-up: the critic trains, the policy does not
    assert rows[1]["critic/policy_frozen"] == 1.0 and "train/loss" not in rows[1]
    assert all(r["critic/policy_frozen"] == 0.0 and "train/loss" in r for r in rows[2:])
    # a fresh critic predicts 0 everywhere; after its first updates it does not
    assert rows[1]["critic/explained_variance"] == 0.0
    assert rows[2]["critic/values_mean"] != 0.0
    # later epochs move the values past the tiny clip range around the old values
    assert any(r["critic/value_clip_frac"] > 0 for r in rows[1:])
    # the implicit PRM's step rewards reach the token rewards from step 2 on
    assert rows[2]["reward/process_sum_mean"] != 0.0
    assert all(r["train/kl"] >= 0 and r["train/kl_loss"] >= 0 for r in rows[2:])
    # the critic's weights and optimizer are in every checkpoint, its value model at the end
    ckpt = out / "checkpoints" / "step_00000003"
    assert (ckpt / "COMPLETE").is_file()
    assert list((ckpt / "critic").glob("*optim_states.pt"))
    from rl.engine.value_model import load_value_model

    critic, _ = load_value_model(out / "final_critic")
    assert critic.value_head.weight.abs().sum() > 0, "critic head never trained"
    start = final_weights(start_model_dir(model_cache))
    final = final_weights(out / "final")
    assert any(not torch.equal(start[k], final[k]) for k in start), "policy never trained"


def test_resume_restores_the_critic(tmp_path: Path, model_cache: Path):
    common = ["trainer.max_steps=4", "trainer.save_every=2", "algo.epochs=2"]
    full = tmp_path / "full"
    check_ok(launch(overrides(full, model_cache, *common)))
    killed = tmp_path / "killed"
    proc = launch(overrides(killed, model_cache, *common), env={"DENSE_RL_KILL_AFTER_STEP": "3"})
    assert proc.returncode != 0
    assert [r["step"] for r in read_metrics(killed)] == [0, 1, 2, 3]
    assert (killed / "checkpoints" / "step_00000002" / "critic").is_dir()
    proc = launch(overrides(killed, model_cache, *common, "trainer.resume=auto"))
    check_ok(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    # a critic restarted from a fresh head would give other values
    assert_resumed_matches(full, killed, CRITIC_KEYS, weights=("final", "final_critic"))
