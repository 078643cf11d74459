"""End-to-end: the `prm` reward head under `deepspeed --num_gpus 2` with ZeRO-3.

The PRM is a tiny random Llama saved with `save_prm`, reading with another tokenizer than the
policy's (the shipped chat-tiny BPE plus a `<step>` tag, against arith-tiny's characters), so
every training step re-renders the responses' steps for it. Under ZeRO-3 the PRM is a
partitioned inference engine, whose forward passes are collective. The agreement filter runs
with `threshold: 1.0`, where the PRM calls every response with steps wrong: the filter then
drops exactly the right responses with steps, so its dropped share is at most the accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.launcher import (
    FAST_OVERRIDES,
    assert_resumed_matches,
    assert_same_weights,
    check_ok,
    launch,
    read_metrics,
)
from tests.models import build_prm, chat_tokenizer

pytestmark = pytest.mark.e2e


def test_prm_head_zero3_two_ranks(tmp_path: Path, model_cache: Path) -> None:
    prm = build_prm(tmp_path / "prm", chat_tokenizer(), step_tag="<step>")
    out = tmp_path / "run"
    kwargs = (
        f"{{path: '{prm}', shaping: min, agreement_filter: true, threshold: 1.0, "
        "outcome_gate: true}"
    )
    overrides = [
        *FAST_OVERRIDES,
        f"output_dir={out}",
        f"model.cache_dir={model_cache}",
        f"reward.heads=[{{head: prm, kwargs: {kwargs}}}]",
        "deepspeed.zero_stage=3",
        "logging.credit_diagnostics=true",
    ]
    check_ok(launch(overrides))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        p_mean = row["head/prm/p_mean"]
        assert 0.0 < p_mean < 1.0
        assert row["head/prm/below_threshold_frac"] == pytest.approx(1.0)  # every p < 1.0
        assert row["head/prm/steps_per_response"] >= 1.0
        dropped = row["head/prm/filtered_frac"]
        assert 0.0 <= dropped <= row["reward/arith_mean"] + 1e-6
        # `min` shaping: r_h = p_h - 1 < 0 on every step of the wrong responses (the gate
        # zeroes the right ones'), so the process sum is negative
        assert row["reward/arith_mean"] < 1.0
        assert row["reward/process_sum_mean"] < 0.0
        # algo.credit: auto -> min_form; its step credit is a share of the advantage
        assert math.isfinite(row["diag/step_credit_share"])
        assert row["diag/step_credit_share"] > 0.0, row


def test_prm_refresh_two_ranks_resumes(tmp_path: Path, model_cache: Path) -> None:
    """On-policy refresh on ZeRO-2, anchored, with the outcome gate, its fallback and the
    trust weight (an all-reduce over the ranks): every step both ranks' responses get the
    `exact` teacher's labels, the PRM trains on all of them plus 3 replayed solutions of its
    "training data" with the class-balanced loss, and only the fresh labels are counted; a
    run killed after step 3 and resumed gives the uninterrupted run's metrics and final PRM
    (the refreshed weights, optimizer and label count are in the checkpoint)."""
    from rl.prm.data import StepExample, write_jsonl
    from rl.prm.model import load_prm

    prm = build_prm(tmp_path / "prm", chat_tokenizer(), step_tag="<step>")
    replay = write_jsonl(
        [
            StepExample(f"{a} +{a}", [f"{a}+{a}={2 * a}", f"Answer: {a}"], [True, False])
            for a in range(5)
        ],
        tmp_path / "replay.jsonl",
    )
    kwargs = (
        f"{{path: '{prm}', shaping: first_error, refresh_every: 1, refresh_lr: 1.0e-3, "
        f"refresh_rows: 6, refresh_replay: '{replay}', refresh_replay_rows: 3, "
        "refresh_balance: true, outcome_gate: true, gate_fallback: true, trust: true}"
    )
    common = [
        *FAST_OVERRIDES,
        f"model.cache_dir={model_cache}",
        f"reward.heads=[{{head: prm, kwargs: {kwargs}}}]",
        "deepspeed.zero_stage=2",
        "trainer.max_steps=4",
        "trainer.save_every=2",
    ]
    full = tmp_path / "full"
    check_ok(launch([*common, f"output_dir={full}"]))
    rows = read_metrics(full)
    labels = [row["head/prm/teacher_labels"] for row in rows[1:]]
    assert labels[0] > 0 and all(b > a for a, b in zip(labels, labels[1:], strict=False)), labels
    assert all(math.isfinite(row["head/prm/refresh_loss"]) for row in rows[1:])
    assert all(row["head/prm/refresh_replayed"] == 3.0 for row in rows[1:])
    assert all(0.0 <= row["head/prm/trust"] <= 1.0 for row in rows[1:])
    final = full / "final_heads" / "prm"
    model, _ = load_prm(final)  # the refreshed PRM, in its convention
    start, _ = load_prm(prm)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(start.state_dict().values(), model.state_dict().values(), strict=True)
    )
    killed = tmp_path / "killed"
    proc = launch([*common, f"output_dir={killed}"], env={"DENSE_RL_KILL_AFTER_STEP": "3"})
    assert proc.returncode != 0
    check_ok(launch([*common, f"output_dir={killed}", "trainer.resume=auto"]))
    assert_resumed_matches(full, killed, {"head/prm/teacher_labels", "head/prm/refresh_loss"})
    assert_same_weights(final, killed / "final_heads" / "prm")
