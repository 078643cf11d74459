"""Process reward heads end to end under the real launcher: the online implicit PRM on
ZeRO-3 with 2 ranks, resume with the PRM's state, and a custom head loaded by import path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from tests.launcher import (
    FAST_OVERRIDES,
    REPO,
    assert_resumed_matches,
    check_ok,
    launch,
    read_metrics,
)
from tests.test_e2e import final_weights, start_model_dir

pytestmark = pytest.mark.e2e

IMPLICIT_PRM = "reward.heads=[{head: implicit_prm, kwargs: {lr: 1.0e-3}}]"


def overrides(out: Path, cache: Path, *extra: str) -> list[str]:
    return [*FAST_OVERRIDES, f"output_dir={out}", f"model.cache_dir={cache}", *extra]


def test_implicit_prm_zero3_two_ranks(tmp_path: Path, model_cache: Path):
    out = tmp_path / "run"
    diag = "logging.credit_diagnostics=true"
    probe = "logging.callbacks=['tests.callbacks:Probe']"  # a user's observer, beside diag
    zero3 = "deepspeed.zero_stage=3"
    check_ok(launch(overrides(out, model_cache, IMPLICIT_PRM, zero3, diag, probe)))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # the callbacks' hooks ran in the loop on every rank: once per step, at each evaluation
    assert [r["probe/credit_calls"] for r in rows[1:]] == [1, 2, 3]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", FAST_OVERRIDES)
    want = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert all(r["probe/responses"] == want for r in rows[1:])
    evals = [r for r in rows if "probe/eval_prompts" in r]
    assert evals[0]["step"] == 0 and evals[0]["probe/logged_before"] == 0
    assert evals[-1]["step"] == 3 and evals[-1]["probe/logged_before"] == len(rows) - 1
    assert all(r["probe/eval_prompts"] == cfg.data.eval_size for r in evals)
    assert all("eval/clean_frac" in r for r in evals)  # the diagnostics' own hook
    for row in rows[1:]:
        for key in ("head/implicit_prm/ce_loss", "head/implicit_prm/acc", "time/heads_s"):
            assert math.isfinite(row[key]), key
    # the PRM learns from the outcomes: its loss falls from log 2 (an untrained PRM)
    assert rows[1]["head/implicit_prm/ce_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[3]["head/implicit_prm/ce_loss"] < rows[1]["head/implicit_prm/ce_loss"]
    # update: after (the default): step 1 is scored by the PRM as it starts, equal to its
    # reference, so no process reward and no step credit; its first update follows
    assert rows[1]["reward/process_sum_mean"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["diag/step_credit_share"] == pytest.approx(0.0, abs=1e-6)
    # from step 2 on the PRM's process rewards are nonzero and reach the advantages: a
    # measurable share of the advantage signal is step credit, not the outcome's
    for row in rows[2:]:
        assert abs(row["reward/process_sum_mean"]) > 1e-4, row
        assert row["train/advantage_abs_mean"] > 0.0
        assert row["diag/step_credit_share"] > 1e-4, row
    # the online PRM is saved with every checkpoint and in HF form at the end
    ckpt = out / "checkpoints" / "step_00000003"
    assert (ckpt / "COMPLETE").is_file()
    assert list((ckpt / "heads" / "implicit_prm").glob("*optim_states.pt"))
    start = final_weights(start_model_dir(model_cache))
    prm = final_weights(out / "final_heads" / "implicit_prm")
    assert any(not torch.equal(start[k], prm[k]) for k in start), "PRM never updated"


def test_resume_restores_the_online_prm(tmp_path: Path, model_cache: Path):
    common = [IMPLICIT_PRM, "trainer.max_steps=4", "trainer.save_every=2"]
    full = tmp_path / "full"
    check_ok(launch(overrides(full, model_cache, *common)))
    killed = tmp_path / "killed"
    proc = launch(overrides(killed, model_cache, *common), env={"DENSE_RL_KILL_AFTER_STEP": "3"})
    assert proc.returncode != 0
    proc = launch(overrides(killed, model_cache, *common, "trainer.resume=auto"))
    check_ok(proc)
    # a PRM restarted from the SFT weights would give other losses
    assert_resumed_matches(
        full, killed, {"head/implicit_prm/ce_loss"}, weights=("final", "final_heads/implicit_prm")
    )


def test_custom_head_by_import_path(tmp_path: Path, model_cache: Path):
    out = tmp_path / "run"
    head = "reward.heads=[{head: 'examples.custom_head:WellFormedSteps', kwargs: {bonus: 0.2}}]"
    diag = "logging.credit_diagnostics=true"
    check_ok(launch(overrides(out, model_cache, head, "trainer.max_steps=2", diag)))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("head/well_formed_steps/bonus_mean" in r for r in rows[1:])
    # "auto" credit picked the head's default ("sum"): process rewards reach the advantages,
    # so part of the advantage signal is step credit (0 under outcome-only credit)
    for row in rows[1:]:
        assert row["reward/process_sum_mean"] != 0.0
        assert row["diag/step_credit_share"] > 1e-3, row


def test_gold_steps_head_two_ranks(tmp_path: Path, model_cache: Path):
    out = tmp_path / "run"
    heads = "reward.heads=[{head: gold_steps, kwargs: {penalty: 1.0}}]"
    diag = ("logging.credit_diagnostics=true", "logging.credit_grad_share=true")
    check_ok(
        launch(overrides(out, model_cache, heads, "algo.credit={name: pav, alpha: 1.0}", *diag))
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:  # diagnostics from the exact labels, over both ranks
        assert 0.0 <= row["diag/zero_spread_group_frac"] <= 1.0
        for key in ("wrong_step_adv_neg_frac", "right_step_adv_neg_frac"):
            value = row[f"diag/{key}"]  # NaN when the batch has no such step
            assert math.isnan(value) or 0.0 <= value <= 1.0
        if row["head/gold_steps/wrong_step_frac"] > 0:
            # -alpha on the first wrong step: step credit adds to the outcome advantage
            assert 0.0 < row["diag/step_credit_share"] <= 1.0
            # measured on the gradients: step credit adds its own part there too
            assert 0.0 < row["diag/step_credit_grad_share"] <= 1.0
            assert -1.0 <= row["diag/step_outcome_grad_cos"] <= 1.0
            assert row["diag/wrong_step_adv_neg_frac"] is not None
            # the exact labels credit every first wrong step the diagnostics find
            assert row["diag/wrong_step_no_step_credit_frac"] == 0.0
    for row in rows[1:]:
        frac = row["head/gold_steps/wrong_step_frac"]
        assert 0.0 <= frac <= 1.0
        # -1 on exactly one step of each wrong response: the process sum is minus that share
        assert row["reward/process_sum_mean"] == pytest.approx(-frac, abs=1e-6)
    assert any(r["head/gold_steps/wrong_step_frac"] > 0 for r in rows[1:])


def test_pav_head_terminal_outcome_two_ranks(tmp_path: Path, model_cache: Path):
    """The PAV head with `terminal: outcome` on an untrained verifier (zero value head, so
    Q^pi = 0.5 before the last step): each response's only step credit is its last step's
    `Q^mu(outcome) - Q^mu(0.5)`, from the trainer's outcome verifier on each rank."""
    from rl.engine.value_model import save_value_model, value_model_from_policy

    policy = start_model_dir(model_cache)
    from transformers import AutoTokenizer

    verifier = save_value_model(
        value_model_from_policy(policy), AutoTokenizer.from_pretrained(policy), tmp_path / "v"
    )
    out = tmp_path / "run"
    head = f"reward.heads=[{{head: pav, kwargs: {{path: '{verifier}', terminal: outcome}}}}]"
    check_ok(launch(overrides(out, model_cache, head, "algo.credit=pav", "trainer.max_steps=2")))
    rows = read_metrics(out)
    mu_half = 1 - 0.5**4  # Best-of-4 prover value of Q^pi = 0.5
    for row in rows[1:]:
        assert row["head/pav/q_prompt"] == pytest.approx(0.5)
        outcome = row["head/pav/q_last_step"]  # the mean outcome of responses with steps
        assert 0.0 <= outcome <= 1.0
        assert row["reward/process_sum_mean"] == pytest.approx(outcome - mu_half, abs=1e-5)
