"""End-to-end: launch/train_pav.py under the real deepspeed launcher (2 ranks, ZeRO-3), then
a one-rank restart that finds every prompt's Monte-Carlo data done."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rl.engine.start_model import build_tokenizer
from rl.pav.data import SolutionRecord, collate, read_records
from rl.pav.fitting import bce_terms
from rl.pav.train import split_by_prompt
from tests.launcher import FAST_OVERRIDES, REPO, TRAIN_PAV, check_ok, launch
from tests.models import tiny_llama

SEARCH = REPO / "launch" / "search.py"

pytestmark = pytest.mark.e2e

PAV_OVERRIDES = [
    "pav.prompts=8",
    "pav.samples_per_prompt=2",
    "pav.n_mc=2",
    "pav.epochs=1",
    "pav.micro_batch_size=4",
    "pav.val_fraction=0.25",
]


def saved_val_bce(verifier_dir: Path, val: list[SolutionRecord]) -> float:
    """Mean BCE of the verifier saved in `verifier_dir` over every labelled position of
    `val`, in one batch on this process."""
    from rl.engine.value_model import load_value_model

    model, tokenizer = load_value_model(verifier_dir)
    batch = collate(val, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    terms = bce_terms(logits, batch, torch.ones(len(val)))
    return float(terms["bce"]) / float(terms["count"])


def test_train_pav_zero3_then_resume(tmp_path: Path, model_cache: Path) -> None:
    from rewards.pav import PAVHead
    from rl.engine.value_model import load_value_model

    out = tmp_path / "verifier"
    common = [
        *FAST_OVERRIDES,
        *PAV_OVERRIDES,
        f"output_dir={tmp_path / 'run'}",
        f"model.cache_dir={model_cache}",
        f"pav.output_dir={out}",
    ]
    # 3 epochs at a high lr, so that the validation BCE moves and `pav.keep=best` chooses
    proc = launch(
        [*common, "deepspeed.zero_stage=3", "pav.epochs=3", "pav.lr=0.02"], script=TRAIN_PAV
    )
    check_ok(proc)
    assert "pav: 8 prompts, 16 solutions" in proc.stdout, proc.stdout[-2000:]
    metrics = json.loads((out / "train_pav_metrics.json").read_text())
    assert metrics["solutions"] == {"train": 12, "val": 4}  # 2 of 8 prompts held out
    history = metrics["epochs"]
    assert len(history) == 3
    assert all(math.isfinite(row[k]) for row in history for k in ("train_bce", "val_bce"))
    assert all(0 <= row["val_acc"] <= 1 for row in history)
    best = min(history, key=lambda row: row["val_bce"])
    assert metrics["kept_epoch"] == best["epoch"]
    assert f"kept epoch {best['epoch']}: val BCE {best['val_bce']:.4f}" in proc.stdout
    # the saved weights (gathered from ZeRO-3 shards mid-run) are that epoch's own
    _, val = split_by_prompt(read_records(out.glob("mc_data.rank*.jsonl")), 0.25, seed=0)
    assert saved_val_bce(out, val) == pytest.approx(best["val_bce"], abs=1e-4)
    data = sorted(out.glob("mc_data.rank*.jsonl"))
    assert [p.name for p in data] == ["mc_data.rank0.jsonl", "mc_data.rank1.jsonl"]
    lines = sum(len(p.read_text().splitlines()) for p in data)
    assert lines == 16

    model, _ = load_value_model(out)  # the weights gathered from ZeRO-3 shards
    assert (
        float(model.value_head.weight.detach().abs().sum()) > 0
    )  # trained away from the zero init
    assert PAVHead(path=str(out)).path == str(out)

    # the restart trains the verifier from another checkpoint with the policy's tokenizer
    other = tmp_path / "other_init"
    tok = build_tokenizer()
    tiny_llama(len(tok), pad_token_id=tok.pad_token_id).save_pretrained(other)
    tok.save_pretrained(other)
    proc = launch([*common, f"pav.init_model={other}"], launcher="python", script=TRAIN_PAV)
    check_ok(proc)
    assert "resuming: 8/8 prompts already done" in proc.stdout
    assert sum(len(p.read_text().splitlines()) for p in data) == lines  # nothing regenerated
    metrics = json.loads((out / "train_pav_metrics.json").read_text())
    assert metrics["verifier_init"] == str(other)
    model, _ = load_value_model(out)
    assert model.backbone.config.hidden_size == 32  # the other checkpoint's; the policy's is 64

    # the same labels as a pool for active labelling: half of each round bought, none rolled out
    pooled = tmp_path / "pooled"
    pool_overrides = [
        f"pav.label_pool={out}",
        f"pav.output_dir={pooled}",
        "pav.label_fraction=0.5",
        "pav.label_round_prompts=2",
        "pav.ensemble_heads=2",
    ]
    proc = launch([*common, *pool_overrides], launcher="python", script=TRAIN_PAV)
    check_ok(proc)
    active = json.loads((pooled / "train_pav_metrics.json").read_text())["active"]
    # 6 training prompts in 3 rounds of 2 -> 4 candidates a round, 2 of them labelled
    assert (active["rounds"], active["candidates"], active["labelled"]) == (3, 12, 6)
    pool = {(r.prompt_index, r.sample): r for r in read_records(out.glob("mc_data.rank*.jsonl"))}
    bought = read_records(pooled.glob("mc_data.rank*.jsonl"))
    assert len(bought) == 6 + 4  # + the 2 held-out prompts' solutions, labelled in full
    assert all(r == pool[(r.prompt_index, r.sample)] for r in bought)


def test_active_labelling_on_two_ranks_then_restart(tmp_path: Path, model_cache: Path) -> None:
    from rl.engine.value_model import load_value_model

    out = tmp_path / "verifier"
    common = [
        *FAST_OVERRIDES,
        *PAV_OVERRIDES,
        "pav.prompts=12",
        "pav.label_fraction=0.5",
        "pav.label_round_prompts=4",
        "pav.ensemble_heads=2",
        f"output_dir={tmp_path / 'run'}",
        f"model.cache_dir={model_cache}",
        f"pav.output_dir={out}",
    ]
    proc = launch(common, script=TRAIN_PAV)
    check_ok(proc)
    assert "active labelling: 9/18 training solutions labelled" in proc.stdout, proc.stdout[-2000:]
    metrics = json.loads((out / "train_pav_metrics.json").read_text())
    active = metrics["active"]
    # 3 of 12 prompts held out (labelled in full); 9 training prompts in rounds of 4, 4, 1
    assert (active["rounds"], active["candidates"], active["labelled"]) == (3, 18, 9)
    assert active["skipped"] == 9
    assert 0 < active["mc_rollouts"] < active["mc_rollouts_all_candidates"]
    assert active["mc_rollouts_val"] > 0
    assert len(active["selector_bce"]) == 3 and all(
        math.isfinite(x) for x in active["selector_bce"]
    )
    assert sorted(p.name for p in out.glob("candidates.rank*.jsonl")) == [
        "candidates.rank0.jsonl",
        "candidates.rank1.jsonl",
    ]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 9
    # round 1 is ranked at random (no ensemble yet), later rounds by the ensemble's scores
    assert any(row["score"] is None for row in skipped)
    assert any(isinstance(row["score"], float) for row in skipped)
    load_value_model(out)
    lines = sum(len(p.read_text().splitlines()) for p in out.glob("mc_data.rank*.jsonl"))

    proc = launch(common, launcher="python", script=TRAIN_PAV)  # every round found done
    check_ok(proc)
    assert sum(len(p.read_text().splitlines()) for p in out.glob("mc_data.rank*.jsonl")) == lines
    again = json.loads((out / "train_pav_metrics.json").read_text())["active"]
    assert (again["labelled"], again["skipped"]) == (9, 9)


def test_search_with_the_verifier_and_exact_labels(tmp_path: Path, model_cache: Path) -> None:
    """launch/search.py --quick: best-of-N (by the last and by the lowest step value), majority
    vote and beam search with a trained PAV verifier, then with the task's exact labels; a
    bad beam width is a one-line error."""
    import csv

    verifier = tmp_path / "verifier"
    common = [*FAST_OVERRIDES, f"model.cache_dir={model_cache}"]
    train = [*common, *PAV_OVERRIDES, f"output_dir={tmp_path / 'run'}"]
    check_ok(launch([*train, f"pav.output_dir={verifier}"], launcher="python", script=TRAIN_PAV))
    for head, kwargs in (("pav", f"{{path: '{verifier}'}}"), ("exact", "")):
        out = tmp_path / f"search_{head}"
        args = ["--quick", "--head", head, "--out", str(out)]
        args += ["--head-kwargs", kwargs] if kwargs else []
        check_ok(launch([*args, *common], launcher="python", script=SEARCH))
        with open(out / "search.csv") as f:
            rows = list(csv.DictReader(f))
        assert [(r["strategy"], r["budget"]) for r in rows] == [
            (s, b) for b in ("2", "4") for s in ("best_of_n", "best_of_n_min", "majority", "beam")
        ]
        for row in rows:
            assert 0.0 <= float(row["accuracy"]) <= 1.0 and row["problems"] == "8"
            assert float(row["generated_tokens_per_problem"]) > 0
            reads = float(row["verifier_tokens_per_problem"])
            # only a model verifier reads tokens, and majority vote never reads any
            assert (reads > 0) == (head == "pav" and row["strategy"] != "majority")
    proc = launch(
        ["--quick", "--head", "exact", "--beam-width", "4", *common],
        launcher="python",
        script=SEARCH,
    )
    assert proc.returncode != 0
    assert "--beam-width 4 is larger than the candidates per step (2)" in proc.stdout + proc.stderr
