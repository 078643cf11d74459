"""Active labelling for the PAV verifier (rl/pav/active.py): the selection maths against
hand-computed values, and the rounds with scripted candidate sources (one process)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from rl.config import load_config
from rl.core.errors import ConfigError, DataError
from rl.data.prompts import PromptRow, val_prompt_set
from rl.pav.active import (
    SKIPPED_FILE,
    as_candidate,
    bootstrap_mask,
    ensemble_bce_terms,
    label_rounds,
    n_selected,
    pool_source,
    rank_candidates,
    rollouts_of,
    rounds_of,
    uncertainty,
)
from rl.pav.data import META_FILE, LabelBatch, SolutionRecord, append_records, read_records
from rl.pav.train import check_pav_config, split_by_prompt, split_records

REPO = Path(__file__).resolve().parent.parent


def record(prompt: int, sample: int, labels: list[float]) -> SolutionRecord:
    h = max(0, len(labels) - 1)
    return SolutionRecord(
        prompt_index=prompt,
        sample=sample,
        prompt_ids=[1, 2],
        response_ids=list(range(3, 3 + 2 * h)),
        step_ends=[2 * i + 1 for i in range(h)],
        labels=labels,
        completion="",
    )


# ----------------------------------------------------------------------------------------------
# Pure maths
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "want"), [(10, 0.25, 3), (8, 0.5, 4), (5, 1.0, 5), (1, 0.01, 1), (0, 0.5, 0)]
)
def test_n_selected_rounds_up(n: int, fraction: float, want: int) -> None:
    assert n_selected(n, fraction) == want


def test_uncertainty_by_hand() -> None:
    # K=2 heads, B=3 rows, T=3 positions
    probs = torch.tensor(
        [
            [[0.9, 0.5, 0.1], [0.2, 0.5, 0.9], [0.5, 0.5, 0.5]],
            [[0.7, 0.5, 0.3], [0.2, 0.5, 0.9], [0.5, 0.5, 0.5]],
        ]
    )
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # row 0: pos 0 mean 0.8 -> aleatoric 0.4, std 0.1 -> epistemic 0.2; pos 2 the same;
    #        the 0.5 at pos 1 is not a labelled position -> 0.4
    # row 1: pos 1 both heads 0.5 -> aleatoric 1.0
    # row 2: no labelled position -> 0
    got = uncertainty(probs, mask)
    assert torch.allclose(got, torch.tensor([0.4, 1.0, 0.0]), atol=1e-6)


def test_uncertainty_takes_the_epistemic_term_when_heads_disagree() -> None:
    probs = torch.tensor([[[1.0]], [[1.0]], [[0.0]]])  # K=3, one position
    # mean 2/3 -> aleatoric 2/3; population std sqrt(2/9) -> epistemic 2 sqrt(2/9) = 0.9428
    got = uncertainty(probs, torch.ones(1, 1))
    assert got.item() == pytest.approx(2 * math.sqrt(2 / 9), abs=1e-6)


def test_epistemic_uncertainty_ignores_a_confident_half() -> None:
    probs = torch.tensor([[[0.5, 0.9]], [[0.5, 0.5]]])  # K=2, one row, two positions
    mask = torch.ones(1, 2)
    # pos 0: heads agree on 0.5 -> epistemic 0 (aleatoric 1); pos 1: std 0.2 -> 0.4
    assert uncertainty(probs, mask, "epistemic").item() == pytest.approx(0.4)
    assert uncertainty(probs, mask).item() == pytest.approx(1.0)


def test_rank_candidates_by_score_then_index_or_seeded_random() -> None:
    assert rank_candidates([0.1, 0.5, 0.5, 0.2], 4, seed=0) == [1, 2, 3, 0]
    random_order = rank_candidates(None, 6, seed=3)
    assert sorted(random_order) == list(range(6))
    assert rank_candidates(None, 6, seed=3) == random_order


def test_bootstrap_mask_gives_every_solution_a_head_and_each_head_about_half() -> None:
    keys = [(p, s) for p in range(500) for s in range(2)]
    mask = bootstrap_mask(keys, heads=4, seed=0)
    assert mask.shape == (1000, 4)
    assert bool((mask.sum(dim=1) >= 1).all())
    # P(head on) = 1/2 + P(no head drawn) / 4 = 0.5 + 1/64
    assert abs(float(mask.mean()) - (0.5 + 1 / 64)) < 0.03
    assert torch.equal(mask, bootstrap_mask(keys, heads=4, seed=0))
    assert not torch.equal(mask, bootstrap_mask(keys, heads=4, seed=1))


def test_rollouts_and_hidden_labels() -> None:
    r = record(0, 0, [0.25, 0.5, 1.0])
    assert rollouts_of(r, n_mc=8) == 16  # two step prefixes; the outcome is free
    assert rollouts_of(record(0, 1, []), n_mc=8) == 0
    assert as_candidate(r).labels == [0.5, 0.5, 1.0]  # placeholders, outcome kept
    assert rounds_of([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]


def test_ensemble_bce_terms_by_hand() -> None:
    # one row, 3 positions, labelled at 0 and 2; K=2 heads, head 1 masked out
    batch = LabelBatch(
        input_ids=torch.zeros(1, 3, dtype=torch.long),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        labels=torch.tensor([[1.0, 0.0, 0.0]]),
        label_mask=torch.tensor([[1.0, 0.0, 1.0]]),
    )
    logits = torch.zeros(1, 3, 2)  # sigmoid 0.5 -> BCE log 2 whatever the label
    terms = ensemble_bce_terms(logits, batch, torch.ones(1), torch.tensor([[1.0, 0.0]]))
    assert terms["count"] == 2.0
    assert float(terms["bce"]) == pytest.approx(2 * math.log(2))
    none = ensemble_bce_terms(logits, batch, torch.zeros(1), torch.tensor([[1.0, 1.0]]))
    assert none["count"] == 0.0


def test_explicit_val_split_matches_the_plain_split() -> None:
    records = [record(p, s, [0.5, 1.0]) for p in range(10) for s in range(2)]
    train, val = split_by_prompt(records, 0.2, seed=4)
    val_prompts = val_prompt_set(range(10), 0.2, seed=4)
    assert len(val_prompts) == 2
    assert split_records(records, val_prompts) == (train, val)
    assert {r.prompt_index for r in val} == val_prompts


# ----------------------------------------------------------------------------------------------
# Config errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pav.label_fraction=0", "pav.label_fraction: must be in (0, 1]"),
        ("pav.label_fraction=1.5", "pav.label_fraction: must be in (0, 1]"),
        ("pav.label_select=entropy", "pav.label_select: 'entropy' is not one of"),
        ("pav.ensemble_heads=1", "pav.ensemble_heads: must be at least 2"),
        ("pav.uncertainty=entropy", "pav.uncertainty: 'entropy' is not one of max, epistemic"),
        ("pav.label_round_prompts=0", "pav.label_round_prompts: must be at least 1"),
        ("pav.label_pool=no/such/dir", "pav.label_pool: no/such/dir is not a directory"),
    ],
)
def test_bad_active_options_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        check_pav_config(load_config(REPO / "configs" / "quickstart_pav.yaml", [override]))


# ----------------------------------------------------------------------------------------------
# Rounds (one process; candidate sources scripted)
# ----------------------------------------------------------------------------------------------


class Pav:
    def __init__(self, out: Path, **kw: Any) -> None:
        self.output_dir = str(out)
        self.samples_per_prompt = 2
        self.n_mc = 4
        self.label_fraction = 0.5
        self.label_round_prompts = 4
        self.selector_epochs = 1
        self.__dict__.update(kw)


class Cfg:
    def __init__(self, out: Path, **kw: Any) -> None:
        self.pav = Pav(out, **kw)
        self.seed = 0


class Dist:
    rank = 0
    world_size = 1
    is_main = True


def rows(n: int) -> list[PromptRow]:
    return [
        PromptRow(index=i, text=f"q{i}", prompt_ids=[1, 2], answer=None, columns={})
        for i in range(n)
    ]


def true_record(c: SolutionRecord) -> SolutionRecord:
    """The 'Monte-Carlo' labels of a candidate: a fixed function of its key."""
    q = (c.prompt_index % 3) / 4
    return replace(c, labels=[q, q, c.labels[-1]])


class Source:
    def __init__(self, fail_on_call: int | None = None) -> None:
        self.label_calls = 0
        self.fail_on_call = fail_on_call

    def sample(self, mine: list[PromptRow]) -> list[SolutionRecord]:
        return [as_candidate(record(r.index, s, [0.0, 0.0, 1.0])) for r in mine for s in range(2)]

    def label(self, candidates: list[SolutionRecord]) -> list[SolutionRecord]:
        self.label_calls += 1
        if self.label_calls == self.fail_on_call:
            raise KeyboardInterrupt  # a kill in the middle of a round's labelling
        return [true_record(c) for c in candidates]


class FakeSelector:
    """Scores a candidate by its prompt index (higher prompt = more uncertain)."""

    def __init__(self) -> None:
        self.trained = False
        self.history: list[float] = []
        self.trained_on: list[int] = []

    def train(self, records: list[SolutionRecord], epochs: int, round_index: int) -> None:
        self.trained = True
        self.trained_on.append(len(records))
        self.history.append(0.5)

    def score(self, candidates: list[SolutionRecord]) -> list[float]:
        return [c.prompt_index + 0.1 * c.sample for c in candidates]


def test_random_rounds_label_the_fraction_and_count_the_rest(tmp_path: Path) -> None:
    cfg, source = Cfg(tmp_path), Source()
    result = label_rounds(cfg, Dist(), rows(10), source.sample, source.label, None)
    # rounds of 4, 4, 2 prompts -> 8, 8, 4 candidates -> 4, 4, 2 labelled
    assert (result.rounds, result.candidates, result.labelled, result.skipped) == (3, 20, 10, 10)
    assert result.mc_rollouts == 10 * 2 * 4  # two step prefixes each, n_mc 4
    assert result.mc_rollouts_all_candidates == 20 * 2 * 4
    labelled = read_records(tmp_path.glob("mc_data.rank*.jsonl"))
    assert all(r == true_record(r) for r in labelled)
    skipped = [json.loads(x) for x in (tmp_path / SKIPPED_FILE).read_text().splitlines()]
    assert len(skipped) == 10 and all(s["score"] is None for s in skipped)

    again = Source()  # a rerun finds every round done and labels nothing
    assert label_rounds(cfg, Dist(), rows(10), again.sample, again.label, None) == result
    assert again.label_calls == 0


def test_uncertainty_rounds_label_the_most_uncertain(tmp_path: Path) -> None:
    cfg, source, selector = Cfg(tmp_path), Source(), FakeSelector()
    result = label_rounds(cfg, Dist(), rows(8), source.sample, source.label, lambda: selector)  # type: ignore[arg-type, return-value]
    labelled = {
        (r.prompt_index, r.sample) for r in read_records(tmp_path.glob("mc_data.rank*.jsonl"))
    }
    # round 2 (prompts 4-7): 4 of 8 candidates, the highest scores: prompts 7 and 6
    assert {k for k in labelled if k[0] >= 4} == {(6, 0), (6, 1), (7, 0), (7, 1)}
    assert result.labelled == 8 and selector.trained_on == [4, 8]  # retrained after each round


def test_a_killed_round_is_redone_on_restart(tmp_path: Path) -> None:
    cfg = Cfg(tmp_path)
    killed = Source(fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        label_rounds(cfg, Dist(), rows(10), killed.sample, killed.label, None)
    assert len(read_records(tmp_path.glob("mc_data.rank*.jsonl"))) == 4  # round 1 kept
    rest = Source()
    result = label_rounds(cfg, Dist(), rows(10), rest.sample, rest.label, None)
    assert rest.label_calls == 2  # rounds 2 and 3 only
    assert (result.labelled, result.skipped) == (10, 10)


def test_label_pool_hides_labels_until_bought_and_checks_its_settings(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    meta = {"model": "m", "n_mc": 4}
    (pool / META_FILE).write_text(json.dumps(meta))
    full = [record(p, s, [0.25, 0.75, 1.0]) for p in range(3) for s in range(2)]
    append_records(pool / "mc_data.rank0.jsonl", full)
    sample, label = pool_source(pool, meta)
    candidates = sample(rows(2))
    assert [c.labels for c in candidates] == [[0.5, 0.5, 1.0]] * 4
    assert label(candidates[:1]) == [full[0]]
    with pytest.raises(DataError, match="has no solutions of prompts \\[5\\]"):
        sample(rows(6)[5:])
    with pytest.raises(ConfigError, match="made with n_mc=4, but the config gives 8"):
        pool_source(pool, {"model": "m", "n_mc": 8})


# ----------------------------------------------------------------------------------------------
# The benchmark (benchmarks/active_labels.py)
# ----------------------------------------------------------------------------------------------


def test_needed_fraction_interpolates_or_says_it_is_censored() -> None:
    from benchmarks.active_labels import needed_fraction

    # F1 0.5 at 1/8 of the rollouts, 0.7 at 1/4: 0.6 is reached half-way, at 3/16
    assert needed_fraction([(0.25, 0.7), (0.125, 0.5)], 0.6) == (pytest.approx(0.1875), "")
    assert needed_fraction([(0.125, 0.8), (0.25, 0.9)], 0.6) == (0.125, "<=")
    assert needed_fraction([(0.125, 0.2), (0.5, 0.3)], 0.6) == (0.5, ">")


def bench_row(seed: int, arm: str, fraction: float, rollouts: int, f1: float) -> dict[str, Any]:
    return {
        "seed": seed,
        "arm": arm,
        "fraction": fraction,
        "labelled": int(100 * fraction),
        "mc_rollouts": rollouts,
        "val_bce": 0.5,
        "val_bce_constant": 0.7,
        "f1": f1,
    }


def test_benchmark_summary_by_hand() -> None:
    from benchmarks.active_labels import arm_overrides, arms, render, summarize

    assert [a.name for a in arms([0.25])] == ["all", "uncertainty_0.25", "random_0.25"]
    assert arm_overrides(arms([0.25])[0], Path("p")) == [
        "pav.label_pool=p",
        "pav.label_fraction=1",
        "pav.label_select=random",
    ]
    (epistemic,) = arms([0.5], ["epistemic"])[1:]
    assert arm_overrides(epistemic, Path("p"))[2:] == [
        "pav.label_select=uncertainty",
        "pav.uncertainty=epistemic",
    ]
    rows = [
        bench_row(0, "all", 1.0, 1000, 0.8),
        bench_row(0, "uncertainty", 0.25, 300, 0.7),
        bench_row(0, "uncertainty", 0.5, 500, 0.9),
        bench_row(0, "random", 0.25, 250, 0.6),
        bench_row(0, "random", 0.5, 500, 0.7),
    ]
    summary = summarize(rows)
    # uncertainty: 0.7 at 0.3, 0.9 at 0.5 -> 0.8 at 0.4; random never reaches 0.8
    (unc,) = summary["needed"]["uncertainty"]
    assert unc["fraction"] == pytest.approx(0.4) and unc["kind"] == ""
    assert summary["needed"]["random"] == [{"seed": 0, "fraction": 0.5, "kind": ">"}]
    text = render(rows, summary, "python benchmarks/active_labels.py")
    assert "| uncertainty | 0.5 | 1 | 50.000 | 500.000 | 0.900 | 0.500 |" in text
    assert "- uncertainty: seed 0: 0.400; mean 0.400" in text
    assert "- random: seed 0: >0.500 (1 seed(s) censored, see per seed)" in text
    # against random at its largest budget (F1 0.7, 500 rollouts): reached at 300 = 0.6
    assert summary["needed_vs_random"] == [{"seed": 0, "fraction": 0.6, "kind": "<="}]


@pytest.mark.e2e
def test_active_labels_benchmark_quick(tmp_path: Path) -> None:
    """--quick: a pool, then all / uncertainty / random on it under the real launcher, each
    verifier scored; the files are written and well formed (numbers not checked)."""
    import csv
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/active_labels.py", "--quick", "--out", str(out)]
    cmd += ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    cmd += ["model.tiny.sft_steps=10"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "arms.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["arm"], float(r["fraction"])) for r in rows] == [
        ("all", 1.0),
        ("uncertainty", 0.5),
        ("random", 0.5),
    ]
    # 16 prompts, 4 held out, 12 in rounds of 4 -> 24 candidates; half labelled in the arms
    assert [int(r["labelled"]) for r in rows] == [24, 12, 12]
    assert all(0.0 <= float(r["f1"]) <= 1.0 for r in rows)
    assert int(rows[1]["mc_rollouts"]) <= int(rows[0]["mc_rollouts"])
    assert "Rollouts needed to reach `all`'s F1" in (out / "summary.md").read_text()


def test_a_rank_without_prompts_in_a_round_samples_and_labels_nothing(tmp_path: Path) -> None:
    class Rank1(Dist):
        rank = 1
        world_size = 2
        is_main = False

    def no_calls(_: Any) -> list[SolutionRecord]:
        raise AssertionError("called with nothing to do")

    cfg = Cfg(tmp_path, label_round_prompts=1)  # one prompt a round: rank 1 never gets one
    # rank 0's share, written as rank 0 would have, so rank 1 finds the round's candidates
    append_records(tmp_path / "candidates.rank0.jsonl", Source().sample(rows(1)))
    result = label_rounds(cfg, Rank1(), rows(1), no_calls, no_calls, None)
    assert result.candidates == 0  # rank 1 saw the round but bought nothing (rank 0 does)
