"""Documented options end to end, each with a check that fails if the option did nothing.
Options that cannot interfere share a launched run (each launch costs about a minute)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.launcher import (
    FAST_OVERRIDES,
    assert_same_weights,
    check_ok,
    compared_keys,
    launch,
    read_metrics,
)
from tests.test_e2e import start_model_dir

pytestmark = pytest.mark.e2e


def overrides(out: Path, cache: Path, *extra: str) -> list[str]:
    return [*FAST_OVERRIDES, f"output_dir={out}", f"model.cache_dir={cache}", *extra]


def assert_rows_equal(want: dict, got: dict, keys: set[str]) -> None:
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)


ZERO3_OPTIONS = [
    "deepspeed.zero_stage=3",
    "rollout.zero3_gather_for_generation=false",
    "algo.entropy_coef=0.05",
    "trainer.save_every=1",
    "trainer.keep_checkpoints=2",
]


def test_zero3_options_pruning_and_explicit_resume(tmp_path: Path, model_cache: Path):
    """One ZeRO-3 run without the whole-model gather for generation, with an entropy bonus,
    a checkpoint every step and 2 kept; then a resume from its older checkpoint named
    explicitly, and the same ZeRO-3 job with the defaults (gather, no bonus) for 1 step."""
    full = tmp_path / "full"
    check_ok(launch(overrides(full, model_cache, *ZERO3_OPTIONS)))
    rows = read_metrics(full)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # trainer.keep_checkpoints=2: of the checkpoints of steps 1, 2 and 3, the newest 2 remain
    kept = sorted(p.name for p in (full / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000002", "step_00000003"]

    # trainer.resume=<dir>: the older of the two (auto would take step 3), into a new
    # output_dir; it continues at step 3 exactly as the run that went on
    older = full / "checkpoints" / "step_00000002"
    resumed = tmp_path / "resumed"
    proc = launch(overrides(resumed, model_cache, *ZERO3_OPTIONS, f"trainer.resume={older}"))
    check_ok(proc)
    assert f"resumed from {older} at step 2" in proc.stdout + proc.stderr
    (row,) = read_metrics(resumed)
    assert row["step"] == 3
    assert compared_keys(row) == compared_keys(rows[3])
    assert_rows_equal(rows[3], row, compared_keys(rows[3]))
    assert_same_weights(full / "final", resumed / "final")

    # the defaults: generation on the gathered model, no entropy bonus
    plain = tmp_path / "plain"
    check_ok(launch(overrides(plain, model_cache, "deepspeed.zero_stage=3", "trainer.max_steps=1")))
    base = read_metrics(plain)
    # generating layer by layer (zero3_gather_for_generation=false) samples exactly what
    # the gathered model does: the same greedy evaluation and step-1 rollouts
    assert base[0]["eval/accuracy"] == rows[0]["eval/accuracy"]
    same = ["reward/outcome_mean", "train/response_tokens_mean", "train/entropy", "train/loss"]
    assert_rows_equal(base[1], rows[1], set(same))
    # the same rollouts and policy, so only the entropy bonus (-0.05 * mean entropy, its
    # own gradient) changes step 1's gradient; train/loss excludes the bonus
    gap = abs(rows[1]["train/grad_norm"] - base[1]["train/grad_norm"])
    assert gap > ENTROPY_GRAD_GAP * base[1]["train/grad_norm"], (rows[1], base[1])


ENTROPY_GRAD_GAP = 1e-3
"""Relative change of step 1's grad norm from the 0.05 entropy bonus: measured 1.1e-2
(1.2803 against 1.2659); the same job twice agrees to 1e-7 or better (train/loss to all
digits here)."""


def implicit_prm(**kwargs: str) -> str:
    options = ", ".join(f"{k}: {v}" for k, v in {"lr": "1.0e-3", **kwargs}.items())
    return f"reward.heads=[{{head: implicit_prm, kwargs: {{{options}}}}}]"


def test_implicit_prm_update_before_and_token_granularity(tmp_path: Path, model_cache: Path):
    """`update: before` learns from a step's outcomes before scoring it, so step 1 already
    has process rewards (0 with `after`, test_heads_e2e); `granularity: token` keeps every
    token's reward, where `step` sums them on step ends: the same totals, other advantages."""
    runs = {}
    for granularity in ("token", "step"):
        out = tmp_path / granularity
        head = implicit_prm(update="before", granularity=granularity)
        check_ok(launch(overrides(out, model_cache, head, "trainer.max_steps=1")))
        runs[granularity] = read_metrics(out)[1]
    token, step = runs["token"], runs["step"]
    for row in (token, step):
        # the update ran on the untrained PRM (log 2), and scoring came after it
        assert row["head/implicit_prm/ce_loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert abs(row["reward/process_sum_mean"]) > 1e-4, row
        assert row["train/advantage_abs_mean"] > 0.0
    assert_rows_equal(step, token, {"reward/outcome_mean", "head/implicit_prm/r_phi"})
    assert token["reward/process_sum_mean"] == pytest.approx(
        step["reward/process_sum_mean"], rel=1e-4
    )
    gap = abs(token["train/advantage_abs_mean"] - step["train/advantage_abs_mean"])
    assert gap > GRANULARITY_ADV_GAP * step["train/advantage_abs_mean"], (token, step)


GRANULARITY_ADV_GAP = 0.5
"""Relative change of train/advantage_abs_mean from step to token granularity: measured 7.6
(0.255 with step sums, 2.18 with every token's reward)."""


def test_pav_mc_oracle_with_a_frozen_implicit_prm(tmp_path: Path, model_cache: Path):
    """The MC-oracle PAV head in a training run, next to an implicit PRM with
    `update: never` (an offline PRM: it stays its reference, so it adds nothing)."""
    out = tmp_path / "run"
    heads = (
        "reward.heads=[{head: pav_mc_oracle, kwargs: {n_mc: 2}}, "
        "{head: implicit_prm, kwargs: {lr: 1.0e-3, update: never}}]"
    )
    # the verifier (the first reward function) is the digit share: the tiny policy never
    # solves the task, so with `arith` as the verifier every Q^pi is 0 and PAV gives nothing
    digits = "reward.functions=[{fn: 'tests.reward_fns:digit_fraction'}]"
    extra = [heads, digits, "algo.credit=pav", "trainer.max_steps=2"]
    extra += ["logging.credit_diagnostics=true"]
    check_ok(launch(overrides(out, model_cache, *extra)))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        # the oracle rolled out the current policy from every step prefix, and its step
        # values reach the advantages
        assert row["head/pav_mc_oracle/mc_rollouts_per_response"] > 0, row
        assert row["head/pav_mc_oracle/step_adv"] != 0.0, row
        assert row["diag/step_credit_share"] > 1e-3, row
        # never updated: no update metrics, and its rewards stay exactly 0
        assert "head/implicit_prm/ce_loss" not in row
        assert row["head/implicit_prm/r_phi"] == pytest.approx(0.0, abs=1e-7)
    assert any(abs(r["reward/process_sum_mean"]) > 1e-4 for r in rows[1:])
    assert_same_weights(start_model_dir(model_cache), out / "final_heads" / "implicit_prm")
