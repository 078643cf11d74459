"""The benchmarks' pure functions on synthetic metrics, and one quick end-to-end run."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import learned_prm as lp
from benchmarks import sample_efficiency as se
from benchmarks import throughput as tp
from benchmarks import zero_memory as zm
from benchmarks.launching import classify_failure, error_line, metrics_complete, step_rows
from rl.algos.credit_specs import MinFormCredit, PrimeCredit

REPO = Path(__file__).resolve().parent.parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def points(method: str, seed: int, accs: list[float], step_s: float) -> list[se.EvalPoint]:
    """Eval points every 100 samples (1 step = 100 samples), from step 0."""
    return [se.EvalPoint(method, seed, i, 100 * i, a, step_s) for i, a in enumerate(accs)]


SYNTHETIC = (
    points("outcome", 0, [0.4, 0.5, 0.6, 0.7], 1.0)
    + points("outcome", 1, [0.4, 0.6, 0.7, 0.7], 1.2)
    + points("prime", 0, [0.4, 0.7, 0.8, 0.8], 1.4)
    + points("prime", 1, [0.4, 0.6, 0.8, 0.9], 1.4)
    + points("pav", 0, [0.4, 0.5, 0.6, 0.65], 2.0)
    + points("pav", 1, [0.4, 0.5, 0.6, 0.65], 2.0)
)
"""Hand-computed: outcome's mean curve 0.40 0.55 0.65 0.70, so the target is 0.70, reached
at 300 samples; prime's mean 0.40 0.65 0.80 0.85 reaches it at 200 (gain 1.5x); pav's never
does. Step times: outcome 1.1 s, prime 1.4 s (1.27x), pav 2.0 s."""


def method_rows(names: list[str]) -> list[se.Method]:
    return [m for m in se.METHODS if m.name in names]


# ----------------------------------------------------------------------------- sample efficiency


def test_mean_std() -> None:
    assert se.mean_std([0.8, 0.9]) == pytest.approx((0.85, math.sqrt(0.005)))
    assert se.mean_std([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        se.mean_std([])


def test_aggregate_curve_uses_common_sample_counts() -> None:
    pts = points("m", 0, [0.1, 0.2, 0.3], 1.0) + points("m", 1, [0.3, 0.4], 1.0)
    curve = se.aggregate_curve(pts)
    assert curve.samples == (0, 100)
    assert curve.mean == pytest.approx((0.2, 0.3))
    assert curve.low == (0.1, 0.2) and curve.high == (0.3, 0.4)
    assert curve.std == pytest.approx((math.sqrt(0.02), math.sqrt(0.02)))
    assert curve.n_seeds == 2


def test_samples_to_reach_and_gain() -> None:
    curve = se.aggregate_curve([p for p in SYNTHETIC if p.method == "prime"])
    assert se.samples_to_reach(curve, 0.7) == 200
    assert se.samples_to_reach(curve, 0.4) == 0
    assert se.samples_to_reach(curve, 0.86) is None
    assert se.efficiency_gain(300, 200) == 1.5
    assert se.efficiency_gain(300, None) is None
    assert se.efficiency_gain(None, 200) is None
    assert se.efficiency_gain(300, 0) == math.inf
    assert se.efficiency_gain(0, 0) == 1.0


def test_summarize_hand_computed() -> None:
    target, rows = se.summarize(list(SYNTHETIC), method_rows(["outcome", "prime", "pav"]))
    assert target == pytest.approx(0.7)
    by = {r.method: r for r in rows}
    assert [r.method for r in rows] == ["outcome", "prime", "pav"]
    assert by["outcome"].samples_to_target == 300 and by["outcome"].gain == 1.0
    assert by["outcome"].final_std == pytest.approx(0.0)
    assert by["prime"].samples_to_target == 200 and by["prime"].gain == 1.5
    assert by["prime"].final_mean == pytest.approx(0.85)
    assert by["prime"].final_std == pytest.approx(math.sqrt(0.005))
    assert by["prime"].step_time_ratio == pytest.approx(1.4 / 1.1)
    assert by["pav"].samples_to_target is None and by["pav"].gain is None
    assert by["pav"].final_samples == 300 and by["pav"].n_seeds == 2


def test_summary_table_text() -> None:
    target, rows = se.summarize(list(SYNTHETIC), method_rows(["outcome", "prime", "pav"]))
    table = se.render_table(target, rows)
    lines = table.splitlines()
    assert "samples to reach 70.0%" in lines[0]
    assert lines[2] == (
        "| GRPO, outcome only | 2 | 70.0 ± 0.0% | 300 | 1.00x | same | 1.00x (1.10 s) | baseline |"
    )
    assert lines[3].startswith(
        "| GRPO + online implicit PRM (PRIME) | 2 | 85.0 ± 7.1% | 200 | 1.50x | same "
        "| 1.27x (1.40 s) |"
    )
    assert "| not reached | - | same | 1.82x (2.00 s) |" in lines[4]
    meta = {"target_rule": "half-gap", "start_accuracy": 0.4, "start_model": "arith-tiny-ab, w"}
    doc = se.render_summary(target, rows, [("ppo_pav", "skipped (3 run(s)): error: x")], meta)
    assert "\nStart model: arith-tiny-ab, w\n" in doc
    assert "Target: 70.0%, the start accuracy 40.0% plus half the gap to 100%" in doc
    assert "- ppo_pav: skipped (3 run(s)): error: x" in doc
    assert "5-6x" in doc and "2.5x" in doc
    doc = se.render_summary(target, rows, [], {"target_rule": "outcome-final"})
    assert "Target: outcome-only GRPO's final mean eval accuracy, 70.0% at 300 samples." in doc


def test_target_rules() -> None:
    """half-gap: start 0.4 + (1 - 0.4) / 2 = 0.7; outcome-final: outcome's last mean, 0.7 in
    SYNTHETIC too; with a different start the two differ."""
    methods = method_rows(["outcome", "prime"])
    pts = [
        se.EvalPoint(p.method, p.seed, p.step, p.samples, p.accuracy + 0.1, p.step_s)
        for p in SYNTHETIC
        if p.method in ("outcome", "prime")
    ]  # start 0.5: target 0.75
    target, rows = se.summarize(pts, methods)
    assert target == pytest.approx(0.75)
    by = {r.method: r for r in rows}
    # outcome's mean curve 0.50 0.65 0.75 0.80 reaches 0.75 at 200; prime's 0.50 0.75 ... at 100
    assert by["outcome"].samples_to_target == 200 and by["prime"].samples_to_target == 100
    assert by["prime"].gain == 2.0 and not by["prime"].gain_is_lower_bound
    target, _ = se.summarize(pts, methods, rule="outcome-final")
    assert target == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown target rule"):
        se.summarize(pts, methods, rule="nope")


def test_gain_is_a_lower_bound_when_outcome_never_reaches_the_target() -> None:
    """start 0.2 -> target 0.6: outcome (0.2 0.3 0.4 0.5) never reaches it within 300
    samples, prime (0.2 0.5 0.7 0.9) does at 200: the gain is more than 300 / 200."""
    pts = points("outcome", 0, [0.2, 0.3, 0.4, 0.5], 1.0) + points(
        "prime", 0, [0.2, 0.5, 0.7, 0.9], 1.0
    )
    target, rows = se.summarize(pts, method_rows(["outcome", "prime"]))
    assert target == pytest.approx(0.6)
    base, prime = rows
    assert base.samples_to_target is None and base.gain is None
    assert prime.gain == pytest.approx(1.5) and prime.gain_is_lower_bound
    table = se.render_table(target, rows)
    assert "| not reached | - |" in table and "| 200 | > 1.50x |" in table


def test_verifier_line_gives_both_thresholds() -> None:
    fixed = {"f1": 0.08, "acc_error": 0.094, "acc_correct": 0.07, "n": 512, "threshold": 0.5}
    tuned = {"f1": 0.41, "acc_error": 0.3, "acc_correct": 0.65, "n": 512, "threshold": 0.13}
    line = se.verifier_line({**fixed, "tuned": tuned})
    assert line.startswith("first-error F1 8.0% on 512 exactly labelled held-out solutions")
    assert "; 41.0% at threshold 0.13, the best on the validation split" in line
    assert "(accuracy on wrong ones 30.0%, on right ones 65.0%;" in line
    assert se.verifier_line({**fixed, "tuned": None}).endswith("threshold 0.5).")
    assert se.verifier_line(None) == ""


def test_extra_samples_are_counted_in_their_own_column() -> None:
    """An MC oracle run: 100 training samples per step plus 300 extra (3 rollouts per
    response) per step; it reaches the target at step 1, where it has 300 extra."""
    rows: list[dict[str, Any]] = [{"step": 0, "samples": 0, "eval/accuracy": 0.4}]
    for step in (1, 2, 3):
        row: dict[str, Any] = {"step": step, "samples": 100 * step, "time/step_s": 1.0}
        row["head/pav_mc_oracle/mc_rollouts_per_response"] = 3.0
        row["eval/accuracy"] = 0.8
        rows.append(row)
    assert se.extra_samples_by_step(rows) == {0: 0.0, 1: 300.0, 2: 600.0, 3: 900.0}
    oracle = se.run_points("pav_mc_oracle", 0, rows)
    assert [p.extra_samples for p in oracle] == [0.0, 300.0, 600.0, 900.0]
    pts = points("outcome", 0, [0.4, 0.5, 0.6, 0.7], 1.0) + oracle
    target, out = se.summarize(pts, method_rows(["outcome", "pav_mc_oracle"]))
    mc = out[1]
    assert mc.samples_to_target == 100 and mc.gain == pytest.approx(3.0)
    assert mc.extra_samples_to_target == 300.0 and mc.gain_with_extra == pytest.approx(0.75)
    assert "| 400 samples: 0.75x |" in se.render_table(target, out)
    # an oracle that never reaches the target still shows what it spent, not "same"
    stuck = [dataclasses.replace(p, accuracy=0.4) for p in oracle]
    target, out = se.summarize(pts[:4] + stuck, method_rows(["outcome", "pav_mc_oracle"]))
    assert out[1].samples_to_target is None and out[1].extra_samples_final == 900.0
    assert "| not reached | - | not reached in 1,200 samples |" in se.render_table(target, out)


def test_diagnostics_per_run_and_per_method() -> None:
    rows: list[dict[str, Any]] = [{"step": 0, "samples": 0, "eval/accuracy": 0.4}]
    for step, share in ((1, 0.2), (2, 0.4), (3, float("nan")), (4, None)):  # null: no items
        rows.append(
            {"step": step, "samples": step, "time/step_s": 1.0, "diag/step_credit_share": share}
        )
    assert se.run_diagnostics(rows) == {"diag/step_credit_share": pytest.approx(0.3)}
    rows[0]["eval/clean_frac"] = 0.25
    assert [p.clean for p in se.run_points("m", 0, rows)] == [0.25]
    diagnostics = {"prime": [{"diag/step_credit_share": 0.3}, {"diag/step_credit_share": 0.5}]}
    _, out = se.summarize(
        list(SYNTHETIC), method_rows(["outcome", "prime"]), diagnostics=diagnostics
    )
    assert out[0].diagnostics == {}
    assert out[1].diagnostics == {"diag/step_credit_share": pytest.approx(0.4)}
    table = se.render_diagnostics(out)
    assert "step-credit share of the advantage" in table.splitlines()[0]
    assert "| GRPO + online implicit PRM (PRIME) | 40.0% |" in table
    assert se.render_diagnostics(out[:1]) == ""
    pts = [
        se.EvalPoint(p.method, p.seed, p.step, p.samples, p.accuracy, p.step_s, clean=0.1 * p.seed)
        for p in SYNTHETIC
    ]
    _, out = se.summarize(pts, method_rows(["outcome"]))
    assert out[0].diagnostics == {"eval/clean_frac": pytest.approx(0.05)}  # seeds 0 and 1
    assert "| 5.0% |" in se.render_diagnostics(out)


def test_summary_without_baseline() -> None:
    pts = [p for p in SYNTHETIC if p.method == "prime"]
    target, rows = se.summarize(pts, method_rows(["outcome", "prime"]))
    assert target == pytest.approx(0.7)  # the start + half the gap needs no baseline
    assert rows[0].gain is None and rows[0].step_time_ratio is None
    target, rows = se.summarize(pts, method_rows(["outcome", "prime"]), rule="outcome-final")
    assert target is None and rows[0].gain is None
    assert "n/a (no target)" in se.render_table(target, rows)


def test_single_seed_accuracy_has_no_std() -> None:
    assert se.format_accuracy(0.5, None) == "50.0%"
    assert se.format_accuracy(0.5, 0.05) == "50.0 ± 5.0%"


def synthetic_metrics() -> list[dict[str, Any]]:
    """metrics.jsonl rows: eval at 0, steps 1-4 (eval at 2 and 4), step 3 logged twice (a
    resumed run's repeat: the last row wins)."""
    rows: list[dict[str, Any]] = [{"step": 0, "samples": 0, "eval/accuracy": 0.25}]
    for step, t in [(1, 9.0), (2, 1.0), (3, 5.0), (3, 2.0), (4, 3.0)]:
        row: dict[str, Any] = {"step": step, "samples": 32 * step, "time/step_s": t}
        row["train/response_tokens_mean"] = 10.0 + step
        if step % 2 == 0:
            row["eval/accuracy"] = 0.25 + 0.1 * step
        rows.append(row)
    return rows


def test_metrics_readers() -> None:
    rows = synthetic_metrics()
    assert [r["step"] for r in step_rows(rows)] == [1, 2, 3, 4]
    assert se.eval_rows(rows) == [(0, 0, 0.25), (2, 64, 0.45), (4, 128, 0.65)]
    assert se.mean_step_time(rows) == pytest.approx((1.0 + 2.0 + 3.0) / 3)  # step 1 dropped
    assert se.mean_step_time(rows, skip_first=0) == pytest.approx(15.0 / 4)
    pts = se.run_points("outcome", 3, rows)
    assert [(p.seed, p.samples) for p in pts] == [(3, 0), (3, 64), (3, 128)]
    assert metrics_complete(rows, 4) and not metrics_complete(rows, 3)
    assert not metrics_complete(rows[:-1], 4)


def test_teacher_labels_are_read_and_summarised() -> None:
    """A refreshed PRM's cumulative `head/prm/teacher_labels` becomes each eval point's
    label count (0 at step 0 and for runs without it); the summary takes the mean over
    seeds at the target (0.25 + 0.75 / 2 = 0.625, first reached at 128 samples, where the
    seeds bought 40 and 80 labels) and at the end."""
    rows = synthetic_metrics()
    for row in rows[1:]:
        row["head/prm/teacher_labels"] = 10.0 * row["step"] + (1 if row is rows[3] else 0)
    assert se.labels_by_step(rows) == {0: 0.0, 1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0}
    pts = se.run_points("prm_refresh", 3, rows)
    assert [p.teacher_labels for p in pts] == [0.0, 20.0, 40.0]
    assert [p.teacher_labels for p in se.run_points("outcome", 3, synthetic_metrics())] == [0] * 3
    replace = dataclasses.replace
    twice = pts + [replace(p, seed=4, teacher_labels=2 * p.teacher_labels) for p in pts]
    base = [replace(p, method="outcome", teacher_labels=0.0) for p in twice]
    target, out = se.summarize(base + twice, method_rows(["outcome", "prm_refresh"]))
    refreshed = next(r for r in out if r.method == "prm_refresh")
    assert target == pytest.approx(0.625)
    assert refreshed.samples_to_target == 128
    assert refreshed.teacher_labels_to_target == pytest.approx(60.0)
    assert refreshed.teacher_labels_final == pytest.approx(60.0)
    assert next(r for r in out if r.method == "outcome").teacher_labels_final == 0.0


def test_evals_csv(tmp_path: Path) -> None:
    se.write_evals_csv(list(SYNTHETIC), tmp_path / "evals.csv")
    with open(tmp_path / "evals.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == se.EVAL_COLUMNS
    assert len(rows) == len(SYNTHETIC)
    assert rows[-1] == {
        "method": "pav",
        "seed": "1",
        "step": "3",
        "samples": "300",
        "eval_accuracy": "0.650000",
        "step_s": "2.0000",
        "extra_samples": "0",
        "clean_frac": "",
        "teacher_labels": "0",
    }


def test_plot(tmp_path: Path) -> None:
    curves = {"a": se.aggregate_curve([p for p in SYNTHETIC if p.method == "prime"])}
    note = se.plot_curves(curves, 0.7, tmp_path / "plot.png")
    if HAS_MATPLOTLIB:
        assert note is None and (tmp_path / "plot.png").stat().st_size > 0
    else:
        assert note is not None and "matplotlib" in note


def test_methods_overrides_load() -> None:
    from rl.config import load_config

    for method in se.METHODS:
        resources = {"verifier": "/tmp/verifier", "prm": "/tmp/prm", "prm_control": "/tmp/c"}
        params = se.with_verifier(method, method.defaults(), resources)
        overrides = se.method_overrides(method, params)
        cfg = load_config(REPO / se.CONFIG, [*se.TASK_OVERRIDES, *overrides])
        assert cfg.data.task["n_steps"] == 4
    (prm,) = se.select_methods("prm_min")
    params = se.with_verifier(prm, prm.defaults(), {"prm": "/tmp/prm", "prm_threshold": 0.4})
    cfg = load_config(REPO / se.CONFIG, se.method_overrides(prm, params))
    assert cfg.algo.credit == MinFormCredit(process_coef=4.0)
    head = cfg.reward.heads[0]
    assert head.head == "prm" and head.kwargs["shaping"] == "min"
    assert head.kwargs["path"] == "/tmp/prm" and head.kwargs["threshold"] == 0.4
    assert se.params_slug(params) == "alpha=4.0,lr=0.0004,shaping=min,threshold=0.4"
    (control,) = se.select_methods("prm_shuffled")
    assert se.missing_resource(control, {"prm": "/tmp/prm"}) == (
        "no PRM: pass --prm-control DIR (benchmarks/learned_prm.py curve trains one)"
    )
    assert se.missing_resource(control, {"prm_control": "/tmp/c"}) is None
    resources = {"prm_control": "/tmp/c", "prm_threshold": 0.18, "prm_control_threshold": 0.77}
    assert se.with_verifier(control, control.defaults(), resources)["threshold"] == 0.77
    assert se.with_verifier(prm, prm.defaults(), {**resources, "prm": "/p"})["threshold"] == 0.18
    prime = se.select_methods("prime")[0]
    params = {"lr": 2e-4, "prm_lr": 1e-5, "baseline": "last_token"}
    cfg = load_config(REPO / se.CONFIG, se.method_overrides(prime, params))
    assert cfg.algo.credit == PrimeCredit(baseline="last_token") and cfg.optim.lr == 2e-4
    assert float(cfg.reward.heads[0].kwargs["lr"]) == 1e-5
    assert se.params_slug(params) == "baseline=last_token,lr=0.0002,prm_lr=1.0e-05"
    base = se.select_methods("pav_base")[0]
    cfg = load_config(
        REPO / se.CONFIG, se.method_overrides(base, {**base.defaults(), "verifier": "v"})
    )
    assert cfg.reward.heads[0].kwargs["prover_k"] == 1  # the negative control: Best-of-1
    with pytest.raises(ValueError, match="unknown method"):
        se.select_methods("outcome,nope")
    assert [m.name for m in se.select_methods("prime,outcome")] == ["outcome", "prime"]


def test_yaml_number_reads_back_as_number() -> None:
    for value in (1e-5, 1e-4, 2e-4, 0.5, 1.0, 1e-3):
        text = se.yaml_number(value)
        assert yaml.safe_load(text) == value, text


def test_tuning_choice() -> None:
    pts = points("m", 0, [0.2, 0.6, 0.8], 1.0)
    assert se.validation_score(pts) == pytest.approx((0.7, 0.8))
    trials: list[dict[str, Any]] = [
        {"value": 1, "score": [0.5, 0.9]},
        {"value": 2, "score": [0.7, 0.6]},
        {"value": 3, "score": [0.7, 0.6]},
        {"value": 4, "score": None},
    ]
    best = se.choose(trials)
    assert best is not None and best["value"] == 2
    assert se.choose([{"value": 1, "score": None}]) is None
    prime = se.select_methods("prime")[0]
    tuning = {"methods": {"prime": {"chosen": {"lr": 5e-5, "prm_lr": 1e-3}}}}
    params, source = se.chosen_params(prime, tuning)
    assert params == {"lr": 5e-5, "prm_lr": 1e-3, "baseline": "per_step"}
    assert "validation" in source
    params, source = se.chosen_params(prime, None)
    assert params == {"lr": 1e-4, "prm_lr": 1e-4, "baseline": "per_step"}
    assert "not tuned" in source
    oracle = se.select_methods("pav_mc_oracle")[0]
    gold = {"methods": {"gold_steps": {"chosen": {"lr": 2e-4, "alpha": 1.0}}}}
    params, source = se.chosen_params(oracle, se.borrow_tuning(gold, oracle, "gold_steps"))
    assert params == {"lr": 2e-4, "alpha": 1.0, "n_mc": 4}
    assert source == "not tuned: gold_steps's tuned values"
    with pytest.raises(KeyError, match="outcome has no tuned values"):
        se.borrow_tuning(gold, oracle, "outcome")


def test_failure_lines() -> None:
    log = "noise\nerror: algo.credit: unknown credit scheme 'gae'\nmore\n"
    assert error_line(log) == "error: algo.credit: unknown credit scheme 'gae'"
    assert classify_failure(log) == "skipped"
    crash = "x\nerror (rank 1): RuntimeError: boom\nTraceback...\n"
    assert error_line(crash) == "error (rank 1): RuntimeError: boom"
    assert classify_failure(crash) == "failed"
    assert error_line("a\nlast line\n\n") == "last line"
    peer = "error (rank 0): RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1"
    assert error_line(f"{peer}\nerror (rank 1): ValueError: no kv cache\n").endswith("kv cache")
    killed = "[launch.py:259:sigkill_handler] ['python', 'x'] exits with return code = -9\n"
    assert (
        error_line(peer + "\n" + killed)
        == "a rank was killed by signal 9 (SIGKILL: out of memory?)"
    )
    assert error_line("Traceback\n  File x\nValueError: bad\nlast\n") == "ValueError: bad"
    assert len(error_line("error: " + "x" * 1000)) == 300


# ----------------------------------------------------------------------------- throughput


def throughput_metrics(heads: bool, scale: float = 1.0) -> list[dict[str, Any]]:
    """Three steps; step 1 is warm-up (slow rollout, large memory)."""
    rows: list[dict[str, Any]] = [{"step": 0, "samples": 0, "eval/accuracy": 0.0}]
    for step in (1, 2, 3):
        warm = 10.0 if step == 1 else 1.0
        row = {
            "step": step,
            "samples": 128 * step,
            "train/response_tokens_mean": 20.0,
            "time/rollout_s": 0.4 * scale * warm,
            "time/reward_s": (0.3 if heads else 0.1) * scale,
            "time/update_s": 0.5 * scale,
            "time/weight_sync_s": 0.0,
            "time/step_s": (1.2 if heads else 1.0) * scale,
        }
        for i, phase in enumerate(tp.MEM_PHASES):
            row[f"mem/{phase}_peak_rss_mb"] = 100.0 * (i + 1) * scale * warm
        if heads:
            row["time/heads_s"] = 0.2 * scale
        rows.append(row)
    return rows


def test_phase_times_and_tokens() -> None:
    times = tp.phase_times(throughput_metrics(heads=True), warmup=1)
    assert times["rollout"] == pytest.approx(0.4)
    assert times["heads"] == pytest.approx(0.2)
    assert times["credit"] == pytest.approx(0.1)
    assert times["step"] == pytest.approx(1.2)
    assert tp.phase_times(throughput_metrics(heads=False), warmup=1)["heads"] == 0.0
    samples, tokens, n = tp.tokens_per_step(throughput_metrics(heads=False), warmup=1)
    assert (samples, tokens, n) == (128.0, 2560.0, 2)


def test_throughput_rows_and_ratios() -> None:
    base = tp.ThroughputConfig(2, "transformers", False)
    prm = tp.ThroughputConfig(3, "transformers", True)
    assert base.name == tp.BASELINE and prm.name == "zero3-transformers-prm"
    rows = [
        tp.measure(base, throughput_metrics(False), {"rank0": 500.0, "rank1": 400.0}, 1),
        tp.measure(prm, throughput_metrics(True, 2.0), {"rank0": 900.0, "rank1": 800.0}, 1),
        tp.skipped_row(tp.ThroughputConfig(2, "vllm", False), "skipped", "failed: no vllm"),
    ]
    tp.add_ratios(rows)
    assert rows[0]["step_tokens_per_s"] == pytest.approx(2560.0)
    assert rows[0]["update_tokens_per_s"] == pytest.approx(2560.0 / 0.5)
    assert rows[1]["step_s_vs_baseline"] == pytest.approx(2.4)
    assert rows[1]["tokens_per_s_vs_baseline"] == pytest.approx(1 / 2.4)
    assert rows[1]["run_peak_rss_mb_max_rank"] == 900.0
    assert rows[1]["run_peak_rss_mb_per_rank"] == "rank0=900;rank1=800"
    assert rows[1]["update_peak_rss_mb"] == pytest.approx(600.0)  # warm-up step 1 dropped
    assert math.isnan(rows[1]["update_peak_gpu_mb"])
    md = tp.render_markdown(rows, {"command": "x", "setup": "y"})
    assert "| zero3-transformers-prm | 0.800 (2.00x) | 0.400 | 0.200 (2.00x) |" in md
    assert "| 1.00 (2.00x) | 0.000 | 2.40 (2.40x) |" in md  # weight sync: no ratio to 0 s
    assert (
        "| zero3-transformers-prm | 200 (2.00x) | 400 (2.00x) | 600 (2.00x) | 800 (2.00x) "
        "| 900 (1.80x) | rank0=900;rank1=800 |"
    ) in md
    assert "| zero2-transformers | 0.400 (1.00x) | 0.000 |" in md  # no ratio to a zero
    assert "- zero2-vllm: skipped: failed: no vllm" in md


def test_trainer_memory_per_phase() -> None:
    rows = throughput_metrics(False)
    rows[1]["mem/update_peak_gpu_mb"] = 9999.0  # warm-up step: not counted
    rows[2]["mem/update_peak_gpu_mb"] = 70.0
    rows[3]["mem/update_peak_gpu_mb"] = 65.0
    assert tp.trainer_memory(rows, 1)["update_peak_gpu_mb"] == 70.0
    row = tp.measure(tp.ThroughputConfig(2, "transformers", False), rows, {}, 1)
    assert row["update_peak_gpu_mb"] == 70.0 and math.isnan(row["run_peak_rss_mb_max_rank"])
    assert "Peak GPU memory" in tp.render_markdown([row], {})


def test_throughput_csv(tmp_path: Path) -> None:
    rows = [
        tp.measure(tp.ThroughputConfig(2, "transformers", False), throughput_metrics(False), {}, 1)
    ]
    rows.append(tp.skipped_row(tp.ThroughputConfig(2, "vllm", False), "skipped", "why"))
    tp.add_ratios(rows)
    tp.write_csv(rows, tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        got = list(csv.DictReader(f))
    assert tuple(got[0]) == tp.CSV_COLUMNS
    assert got[0]["status"] == "ok" and float(got[0]["step_s_vs_baseline"]) == 1.0
    assert got[1]["status"] == "skipped" and got[1]["step_s"] == ""
    assert got[0]["heads_tokens_per_s"] == ""  # no heads: NaN, written empty


def test_mfu_and_peak_flops() -> None:
    assert tp.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert tp.peak_flops("NVIDIA H200") == 989e12
    assert tp.peak_flops("cpu") is None
    # 6 * 1e9 params * 1e4 tokens / 1 s / (2 x 989e12) = 3.03%
    assert tp.mfu(10**9, 1e4, 1.0, 989e12, 2) == pytest.approx(6e13 / 1.978e15)


def test_select_configs() -> None:
    names = [c.name for c in tp.select_configs(None)]
    assert names[0] == tp.BASELINE and len(names) == 10 and len(set(names)) == 10
    assert [c.name for c in tp.select_configs("zero3-vllm-prm")] == ["zero3-vllm-prm"]
    (compiled,) = tp.select_configs("zero2-transformers-compiled")
    assert compiled.overrides() == [
        "deepspeed.zero_stage=2",
        "rollout.backend={name: transformers, cache: static, compile: true}",
    ]
    with pytest.raises(ValueError):
        tp.select_configs("zero5")


# ----------------------------------------------------------------------------- memory estimates


def test_memory_estimates() -> None:
    rows = zm.estimates(gpus=8)
    assert len(rows) == len(zm.SHAPES) * len(zm.SETUPS) * 2
    assert all(b > 0 for r in rows for _, b in r.parts)
    by = {(r.model, r.setup, r.stage): r.total for r in rows}
    for shape in zm.SHAPES:
        for setup in zm.SETUPS:
            assert by[(shape.name, setup, 3)] < by[(shape.name, setup, 2)]
    p = 1_500_000_000
    assert zm.trained_bytes(p, 1, 2, 8) == 2 * p + 18 * p // 8  # DeepSpeed's ZeRO-2 formula
    assert zm.frozen_bytes(p, 10, 3, 8) == 2 * p // 8 + 40
    doc = zm.render_document(8)
    assert "| 7B | GRPO (policy only) | 2 | 27.7 | - | 27.7 |" in doc
    assert "offload_optimizer=none" in doc  # DeepSpeed's own printout is included


# ----------------------------------------------------------------------------- end to end


SHORT_SFT = "model.tiny.sft_steps=10"
"""The e2e test does not need a warmed-up start model, only one that loads (builds in s)."""


@pytest.mark.e2e
def test_quick_benchmarks_end_to_end(tmp_path: Path) -> None:
    """sample_efficiency --quick (outcome + PRIME, 2 steps) and throughput --quick (baseline
    only): the files are written and well formed; the numbers are not checked."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cache = tmp_path / "cache"
    se_out = tmp_path / "se"
    cmd = [sys.executable, "benchmarks/sample_efficiency.py", "--quick"]
    cmd += ["--methods", "outcome,prime", "--steps", "2", "--eval-every", "1"]
    cmd += ["--runs-dir", str(tmp_path / "se_runs"), "--out", str(se_out)]
    cmd += ["--cache-dir", str(cache), SHORT_SFT]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(se_out / "evals.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == se.EVAL_COLUMNS
    assert {(r["method"], int(r["step"])) for r in rows} == {
        (m, s) for m in ("outcome", "prime") for s in (0, 1, 2)
    }
    assert all(0.0 <= float(r["eval_accuracy"]) <= 1.0 for r in rows)
    summary = (se_out / "summary.md").read_text()
    assert "| GRPO, outcome only | 1 |" in summary
    assert "| GRPO + online implicit PRM (PRIME) | 1 |" in summary
    if HAS_MATPLOTLIB:
        assert (se_out / "accuracy_vs_samples.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in summary
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count(": cached") == 2  # finished runs reused

    tp_out = tmp_path / "tp"
    cmd = [sys.executable, "benchmarks/throughput.py", "--quick", "--configs", tp.BASELINE]
    cmd += ["--steps", "2", "--runs-dir", str(tmp_path / "tp_runs"), "--out", str(tp_out)]
    cmd += ["--cache-dir", str(cache), SHORT_SFT]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tp_out / "throughput.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok" and float(row["step_s"]) > 0
    assert float(row["run_peak_rss_mb_max_rank"]) > 0
    assert float(row["update_peak_rss_mb"]) > 0
    assert f"| {tp.BASELINE} |" in (tp_out / "throughput.md").read_text()
    assert "| 7B |" in (tp_out / "memory_estimates.md").read_text()


def test_release_shm_removes_only_this_jobs_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import launching

    monkeypatch.setattr(launching, "SHM_DIR", tmp_path)
    uid = os.getuid()
    mine = [tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4242_{r}" for r in (0, 1)]
    other = tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4243_0"
    for path in [*mine, other]:
        path.write_bytes(b"x")
    assert sorted(launching.release_shm(4242)) == sorted(mine)
    assert other.exists() and not any(p.exists() for p in mine)


def test_start_policy_report_carries_the_builds_sft_record(tmp_path: Path) -> None:
    from benchmarks.start_policy import sft_record

    assert sft_record(tmp_path) == {}  # not a built-in start model
    curve = {"every_steps": 100, "mean_loss": [1.0, 0.5]}
    info = {"final_sft_loss": 0.2, "sft_loss_curve": curve, "weights_sha256": "ab", "kind": "x"}
    (tmp_path / "build_info.json").write_text(json.dumps(info))
    assert sft_record(tmp_path) == {"final_sft_loss": 0.2, "sft_loss_curve": curve}


def test_start_policy_chain_stats_by_hand() -> None:
    from benchmarks.start_policy import chain_stats
    from rl.tasks.arith import parse_prompt

    p = parse_prompt("3 +4 *2 -6")  # 3+4=0, 0*2=0, 0-6=1
    completions = [
        "3+4=0\n0*2=0\n0-6=1\nAnswer: 1",  # clean
        "3+4=0\n0*2=2\n2-6=3\nAnswer: 3",  # wrong at step 1
        "3+4=1\n1*2=2\n2-6=1\nAnswer: 1",  # wrong at step 0, right by chance
        "3+4=0",  # stops early: wrong at step 1
    ]
    stats = chain_stats([p] * 4, completions)
    assert stats["accuracy"] == 0.5 and stats["clean"] == 0.25
    assert stats["right_by_chance"] == 0.25
    assert stats["first_error_hist"] == {0: 1, 1: 2}


# ------------------------------------------------------------------ start-model copies


def test_tuned_values_from_another_start_model_copy_are_refused(tmp_path: Path) -> None:
    old = "arith-tiny-7faa9f672c57ea46, weights sha256 f0f942929a6f6777"
    new = "arith-tiny-7faa9f672c57ea46, weights sha256 46f0d54e01abb8fd"
    source = tmp_path / "tuning.json"
    why = se.other_start_model(old, new, source)
    assert why is not None
    assert old in why and new in why and str(source) in why
    assert "--allow-other-start-model" in why
    assert se.other_start_model(old, old, source) is None
    assert se.other_start_model(None, new, source) is None  # older files recorded none
    assert se.other_start_model(old, "", source) is None  # not a built-in start model
    args = se.parse_args(["--allow-other-start-model"])
    assert args.allow_other_start_model and not se.parse_args([]).allow_other_start_model

    from benchmarks import regimes

    argv = ["run", "--regime", "s8_q30", "--allow-other-start-model"]
    forwarded = regimes.sample_efficiency_argv(regimes.parse_args(argv), regimes.regime("s8_q30"))
    assert "--allow-other-start-model" in forwarded


def test_finished_run_from_another_start_model_copy_is_not_reused(tmp_path: Path) -> None:
    from benchmarks import launching

    def spec(start_model: str) -> launching.RunSpec:
        return launching.RunSpec(
            "outcome seed0", tmp_path / "run", ("seed=0",), max_steps=0, start_model=start_model
        )

    launching.prepare_dir(spec("copy A"))
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n')
    assert launching.is_cached(spec("copy A"))
    assert not launching.is_cached(spec("copy B"))
    # runs of other benchmarks (no start model recorded) keep their old records
    assert "start_model" not in launching.spec_record(spec(""))
    launching.prepare_dir(spec("copy B"))  # another copy's run dir is wiped, not resumed
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_runs_are_keyed_by_the_resolved_config(tmp_path: Path) -> None:
    from benchmarks import launching

    def spec(*overrides: str) -> launching.RunSpec:
        return launching.RunSpec("pav seed0", tmp_path / "run", overrides, max_steps=0)

    old = spec("reward.heads=[{head: pav}]", "algo.credit=pav", "algo.credit_kwargs={alpha: 2}")
    launching.prepare_dir(old)  # recorded in the old spelling
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n')
    assert launching.is_cached(
        spec("reward.heads=[{head: pav}]", "algo.credit={name: pav, alpha: 2.0}")
    )
    assert not launching.is_cached(
        spec("reward.heads=[{head: pav}]", "algo.credit={name: pav, alpha: 3}")
    )
    assert not launching.is_cached(spec("algo.credit=nonsense"))  # no longer loads: not the run
    assert not launching.same_run({**launching.spec_record(old), "ranks": 1}, old)


# ----------------------------------------------------------------------------- regime sweep


def test_regime_sweep_commands_and_summary(tmp_path: Path) -> None:
    from benchmarks import regimes

    args = regimes.parse_args(["tune", "--regime", "s8_q30", "--methods", "pav"])
    argv = regimes.sample_efficiency_argv(args, regimes.regime("s8_q30"))
    assert argv[-6:] == list(regimes.regime("s8_q30").overrides)
    assert "--tune" in argv and argv[argv.index("--methods") + 1] == "pav"
    assert argv[argv.index("--out") + 1] == "benchmarks/results/sample_efficiency_regimes/s8_q30"
    with pytest.raises(ValueError, match="unknown regime 'nope'"):
        regimes.regime("nope")

    (tmp_path / "start_policy").mkdir()
    report = {
        "greedy": {"accuracy": 0.25},
        "sampled": {
            "accuracy": 0.3,
            "clean": 0.1,
            "right_by_chance": 0.2,
            "first_error_hist": {"0": 3, "1": 1},
        },
        "all_wrong_group_frac": 0.4,
    }
    (tmp_path / "start_policy" / "s8_q30.json").write_text(json.dumps(report))
    target, rows = se.summarize(list(SYNTHETIC), method_rows(["outcome", "prime"]))
    summary = {
        "target": target,
        "start_accuracy": 0.4,
        "verifier_quality": {"f1": 0.5, "tuned": {"f1": 0.6, "threshold": 0.12}},
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    (tmp_path / "s8_q30").mkdir()
    (tmp_path / "s8_q30" / "summary.json").write_text(json.dumps(summary))
    text = regimes.render(tmp_path, list(regimes.REGIMES))
    assert "| s8_q30 | 8 steps, + - *, 30% of facts misremembered | 25.0% | 30.0% | 10.0% " in text
    assert "| 40.0% | 75.0% | 40.0% | 70.0% | 50.0% | 60.0% (0.12) |" in text  # groups, top...
    assert (
        "| s8_q30 | GRPO + online implicit PRM (PRIME) | 2 | 85.0 ± 7.1% | 200 | 1.50x | same |"
        in text
    )
    assert "| s4_q15 | (not run) |" in text


# ----------------------------------------------------------------------------- gradient share


def test_grad_share_remeasure_spec_and_checks(tmp_path: Path) -> None:
    from benchmarks import grad_share

    run = tmp_path / "run"
    run.mkdir()
    record = {
        "script": "launch/train_rl.py",
        "config": "configs/quickstart.yaml",
        "overrides": ["trainer.max_steps=40", "logging.credit_diagnostics=true", "seed=1"],
        "ranks": 2,
    }
    (run / "benchmark_run.json").write_text(json.dumps(record))
    spec = grad_share.remeasure_spec(run)
    assert spec.overrides == (*record["overrides"], "logging.credit_grad_share=true")
    assert spec.out_dir == run.resolve() / "grad_share" and spec.max_steps == 40 and spec.ranks == 2
    record["overrides"] = ["trainer.max_steps=40"]
    (run / "benchmark_run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="no logging.credit_diagnostics"):
        grad_share.remeasure_spec(run)

    a = [{"step": 1, "train/loss": 0.5, "reward/outcome_mean": 0.25}]
    assert grad_share.mismatches(a, [dict(a[0])]) == []
    b = [{"step": 1, "train/loss": 0.5001, "reward/outcome_mean": 0.25}]
    assert grad_share.mismatches(a, b) == ["step 1 train/loss: 0.5 vs 0.5001"]
    assert grad_share.mismatches(a, []) == ["1 rows vs 0"]
    rows = [{"x": 0.2}, {"x": None}, {"x": float("nan")}, {"x": 0.4}]
    assert grad_share.mean_of(rows, "x") == pytest.approx(0.3)
    assert math.isnan(grad_share.mean_of([], "x"))


def test_tuning_over_several_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.launching import RunResult

    assert se.tune_seeds(3) == [se.TUNE_SEED, se.TUNE_SEED + 1, se.TUNE_SEED + 2]
    assert se.mean_score([(0.4, 0.5), (0.6, 0.9)]) == pytest.approx((0.5, 0.7))
    assert se.mean_score([(0.4, 0.5), None]) is None  # compared on all seeds or not at all
    assert se.mean_score([]) is None
    setup = se.Setup(tmp_path, (), (), 2, 1, 2)
    outcome = se.select_methods("outcome")[0]
    trial = {"lr": 1e-4}
    first = se.tune_dir(setup, outcome, trial, se.TUNE_SEED)
    assert first == tmp_path / "tune" / "outcome" / "lr=0.0001"  # as with one seed
    assert se.tune_dir(setup, outcome, trial, se.TUNE_SEED + 1) == first / "seed1001"

    # final validation accuracy by (lr, seed): lr 1e-4 wins on the mean, not on seed 1000
    final = {(1e-4, 1000): 0.4, (1e-4, 1001): 0.8, (2e-4, 1000): 0.5, (2e-4, 1001): 0.5}

    def fake_run_all(specs: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        out = []
        for spec in specs:
            lr = float(next(o for o in spec.overrides if o.startswith("optim.lr=")).split("=")[1])
            seed = int(next(o for o in spec.overrides if o.startswith("seed=")).split("=")[1])
            spec.out_dir.mkdir(parents=True, exist_ok=True)
            rows = [
                {"step": 0, "samples": 0, "eval/accuracy": 0.1},
                {"step": 2, "samples": 64, "eval/accuracy": final[(lr, seed)]},
            ]
            (spec.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            out.append(RunResult(spec, "done"))
        return out

    monkeypatch.setattr(se, "run_all", fake_run_all)
    lr = se.Tunable("lr", 1e-4, (1e-4, 2e-4))
    trials = se.tune_coordinate(setup, outcome, {"lr": 1e-4}, lr, 2)
    assert [t["score"] for t in trials] == [pytest.approx([0.6, 0.6]), pytest.approx([0.5, 0.5])]
    assert trials[0]["seed_scores"] == [[0.4, 0.4], [0.8, 0.8]]
    best = se.choose(trials)
    assert best is not None and best["value"] == 1e-4
    one = se.tune_coordinate(setup, outcome, {"lr": 1e-4}, lr, 1)
    best = se.choose(one)
    assert best is not None and best["value"] == 2e-4  # seed 1000 alone picks the other


def test_tuning_records_each_methods_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.launching import RunResult

    def fake_run_all(specs: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        for spec in specs:
            spec.out_dir.mkdir(parents=True, exist_ok=True)
            rows = [{"step": 0, "samples": 0, "eval/accuracy": 0.1}]
            rows.append({"step": 2, "samples": 64, "eval/accuracy": 0.5})
            (spec.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return [RunResult(spec, "done") for spec in specs]

    monkeypatch.setattr(se, "run_all", fake_run_all)
    setup = se.Setup(tmp_path / "runs", (), (), 2, 1, 2)
    path = tmp_path / "tuning.json"
    # a record written before methods carried their own seeds: the file's seeds are its
    path.write_text(json.dumps({"seeds": [1000, 1001, 1002], "methods": {"old": {"chosen": {}}}}))
    se.tune(setup, se.select_methods("outcome"), {}, path, 3)
    se.tune(setup, se.select_methods("gold_steps"), {}, path, 1)
    methods = json.loads(path.read_text())["methods"]
    assert methods["old"]["seeds"] == [1000, 1001, 1002]
    assert methods["outcome"]["seeds"] == se.tune_seeds(3)
    assert methods["gold_steps"]["seeds"] == [se.TUNE_SEED]
    tuning = json.loads(path.read_text())
    assert se.chosen_params(se.select_methods("outcome")[0], tuning)[1].endswith("(3 seeds)")
    assert se.chosen_params(se.select_methods("gold_steps")[0], tuning)[1].endswith("(1 seed)")


def test_effective_overrides_keep_the_last_value_per_key() -> None:
    given = [
        "data.task.n_steps=4",
        "data.task.modulus=10",
        "reward.heads=[{head: pav, kwargs: {path: 'a=b'}}]",
        "data.task.modulus=11",
        "data.task.n_steps=8",
    ]
    assert se.effective_overrides(given) == [
        "data.task.n_steps=8",
        "data.task.modulus=11",
        "reward.heads=[{head: pav, kwargs: {path: 'a=b'}}]",
    ]


def test_every_regime_is_a_valid_task() -> None:
    from benchmarks import regimes
    from rl.config import load_config
    from rl.engine.tiny_config import TinyModelConfig
    from rl.tasks.arith import ArithConfig

    for r in regimes.REGIMES:
        cfg = load_config(REPO / se.CONFIG, list(r.overrides))
        task = ArithConfig(**dict(cfg.data.task))  # raises on a bad knob
        assert f"data.task.n_steps={task.n_steps}" in r.overrides
    no_zero = load_config(REPO / se.CONFIG, list(regimes.regime("s8m11nz_q50").overrides))
    assert ArithConfig(**dict(no_zero.data.task)).operand_min == 1
    # each converged recipe differs from its 1,200-step one only in the SFT length
    for name in ("s8m23nz_q40", "s4m11_q30", "s8m11_q30"):
        short = load_config(REPO / se.CONFIG, list(regimes.regime(name).overrides))
        long = load_config(REPO / se.CONFIG, list(regimes.regime(f"{name}_sft3000").overrides))
        short_tiny, long_tiny = (TinyModelConfig(**dict(c.model.tiny)) for c in (short, long))
        assert [short_tiny.sft_steps, long_tiny.sft_steps] == [1200, 3000]
        assert dataclasses.replace(long_tiny, sft_steps=1200) == short_tiny
        assert dict(short.data.task) == dict(long.data.task)
        assert short.rollout == long.rollout


def test_launch_command_falls_back_to_the_launcher_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `deepspeed` script beside the interpreter when there is one (a venv), else
    `python -m deepspeed.launcher.runner` (packages installed with `pip --target`)."""
    from benchmarks.launching import RunSpec, command

    spec = RunSpec(name="r", out_dir=tmp_path / "run", overrides=("seed=1",), max_steps=2)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    python = bindir / "python3"
    monkeypatch.setattr(sys, "executable", str(python))
    tail = ["--num_gpus", "2", spec.script, "--config", spec.config, "seed=1"]
    tail.append(f"output_dir={spec.out_dir}")
    assert command(spec) == [str(python), "-m", "deepspeed.launcher.runner", *tail]
    (bindir / "deepspeed").write_text("#!/bin/sh\n")
    assert command(spec) == [str(bindir / "deepspeed"), *tail]


def test_throughput_fails_only_when_nothing_was_measured() -> None:
    ok = {"config": "a", "status": "ok"}
    failed = {"config": "b", "status": "failed", "reason": "error (rank 0): ValueError"}
    assert tp.exit_status([ok, failed]) == 0
    assert tp.exit_status([failed]) == 1
    assert tp.exit_status([]) == 1


def test_shuffled_control_keeps_lengths_and_label_rate_but_moves_labels() -> None:
    from rl.prm.data import StepExample

    examples = [
        StepExample(f"p{i}", [f"s{h}" for h in range(n)], [h < n // 2 for h in range(n)])
        for i, n in enumerate([2, 5, 3, 8, 4, 6])
    ]
    shuffled = lp.shuffle_labels(examples, seed=0)
    assert [len(e.labels) for e in shuffled] == [len(e.labels) for e in examples]
    assert sum(sum(e.labels) for e in shuffled) == sum(sum(e.labels) for e in examples)
    assert [e.labels for e in shuffled] != [e.labels for e in examples]
    assert [e.completions for e in shuffled] == [e.completions for e in examples]
    assert lp.shuffle_labels(examples, seed=0) == shuffled  # seeded


def test_tune_grid_parses_numbers_and_names_a_bad_item() -> None:
    assert se.parse_grid(["alpha=4.0", "baseline=per_step,last_token"]) == {
        "alpha": (4.0,),
        "baseline": ("per_step", "last_token"),
    }
    with pytest.raises(ValueError, match="--tune-grid 'alpha'"):
        se.parse_grid(["alpha"])


def test_learned_prm_search_rows_read_search_tables(tmp_path: Path) -> None:
    """summary.json's `search` rows: one per line of each `<setup>/search/<policy>_<scorer>/
    search.csv`, majority vote with no scorer, tokens and accuracy as written."""
    run = tmp_path / "s8m11" / "search" / "sft_prm"
    run.mkdir(parents=True)
    (run / "search.csv").write_text(
        "strategy,budget,beam_width,expansions,accuracy,generated_tokens_per_problem,"
        "verifier_tokens_per_problem,problems,scorer_cache\n"
        "best_of_n_min,4,0,4,0.5,240.5,180.0,128,on\n"
        "majority,4,0,4,0.25,240.5,0.0,128,on\n"
    )
    rows = lp.search_rows(tmp_path)
    assert rows == [
        {
            "regime": "s8m11",
            "policy": "sft",
            "scorer": "prm",
            "strategy": "best_of_n_min",
            "budget": 4,
            "budget_tokens": 240.5,
            "verifier_tokens": 180.0,
            "accuracy": 0.5,
            "problems": 128,
        },
        {
            "regime": "s8m11",
            "policy": "sft",
            "scorer": "none",
            "strategy": "majority",
            "budget": 4,
            "budget_tokens": 240.5,
            "verifier_tokens": 0.0,
            "accuracy": 0.25,
            "problems": 128,
        },
    ]


def test_learned_prm_steps_matched_budgets() -> None:
    """With --steps-matched a 10% budget trains 10x the epochs and validates every 10th; the
    full pool and an unmatched curve keep the settings as given."""
    from rl.config import PRMConfig

    prm = PRMConfig(epochs=10, validate_every=1, keep="best_f1")
    tenth = lp.budget_prm(prm, 0.1, steps_matched=True)
    assert (tenth.epochs, tenth.validate_every, tenth.keep) == (100, 10, "best_f1")
    assert lp.budget_prm(prm, 0.03, steps_matched=True).epochs == 333
    assert lp.budget_prm(prm, 1.0, steps_matched=True) == prm
    assert lp.budget_prm(prm, 0.1, steps_matched=False) == prm


def test_learned_prm_rl_rows_read_every_rl_study(tmp_path: Path) -> None:
    """summary.json's `rl` rows: one per method of each `<setup>/rl*/summary.json`, named by
    its study directory, with the teacher labels of the PRM its command read."""
    (tmp_path / "s8m23").mkdir()
    key = ("uniform", 1.0, 0, "{}")
    (tmp_path / "s8m23" / "label_curve.jsonl").write_text(
        json.dumps(
            {"selection": "uniform", "budget_frac": 1.0, "seed": 0, "settings": "{}"}
            | {"teacher_labels": 6990}
        )
        + "\n"
    )
    for study, method in (("rl", "outcome"), ("rl_located", "prm_located")):
        (tmp_path / "s8m23" / study).mkdir()
        report = {
            "command": f"sample_efficiency.py --prm x/{lp.prm_dir_name(key)} --seeds 3",
            "target": 0.5,
            "rows": [
                {
                    "method": method,
                    "n_seeds": 3,
                    "final_mean": 0.6,
                    "final_std": 0.1,
                    "samples_to_target": 7680,
                    "gain": 3.0,
                }
            ],
        }
        (tmp_path / "s8m23" / study / "summary.json").write_text(json.dumps(report))
    rows = lp.rl_rows(tmp_path)
    assert [(r["study"], r["method"], r["prm_labels"]) for r in rows] == [
        ("rl", "outcome", None),
        ("rl_located", "prm_located", 6990),
    ]
    assert rows[1]["ratio_vs_outcome"] == 3.0 and rows[1]["regime"] == "s8m23"
