"""benchmarks/pav_labels.py and rl.pav.fitting.soft_bce: clean/broken prefix marking and the
held-out BCE of label predictors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from benchmarks import pav_labels as pl
from rl.engine.start_model import build_tokenizer
from rl.pav.data import META_FILE, SolutionRecord
from rl.pav.fitting import soft_bce
from rl.tasks.arith import ArithConfig, sample_problems, step_lines


@pytest.mark.parametrize(
    ("first_error", "n", "want"),
    [(-1, 3, [True, True, True]), (1, 4, [True, True, False, False]), (0, 3, [True, False, False])],
)
def test_prefix_clean(first_error: int, n: int, want: list[bool]) -> None:
    assert pl.prefix_clean(first_error, n) == want


def test_soft_bce_and_entropy_hand_values() -> None:
    assert soft_bce(0.5, 1.0) == pytest.approx(math.log(2))
    # -(0.5 ln 0.25 + 0.5 ln 0.75) = 0.5 * (1.386294 + 0.287682)
    assert soft_bce(0.25, 0.5) == pytest.approx(0.836988, abs=1e-6)
    assert soft_bce(0.0, 1.0) == pytest.approx(-math.log(1e-12))  # clipped: finite
    assert soft_bce(1.0, 1.0, eps=1e-4) == pytest.approx(-math.log(1 - 1e-4))
    assert pl.entropy(0.0) == 0.0 and pl.entropy(1.0) == 0.0
    assert pl.entropy(0.5) == pytest.approx(math.log(2))


def test_held_out_bce_per_key_means() -> None:
    L = pl.Label
    train = [L(0, 0, True, 0.2), L(0, 0, True, 0.4), L(0, 1, True, 1.0), L(0, 1, False, 0.0)]
    test = [L(1, 1, True, 1.0), L(1, 2, False, 1.0)]
    # constant: overall train mean 0.4 for both -> -ln 0.4 each
    assert pl.held_out_bce(train, test, pl.PREDICTORS["constant"]) == pytest.approx(-math.log(0.4))
    # (length, clean): (1, True) -> 1.0, exact; (2, False) unseen -> overall 0.4
    want = (0.0 - math.log(0.4)) / 2
    assert pl.held_out_bce(train, test, pl.PREDICTORS["prefix length + clean"]) == pytest.approx(
        want
    )


def test_read_labels_marks_prefixes_from_the_exact_first_error(tmp_path: Path) -> None:
    cfg = ArithConfig(n_steps=2, modulus=11, operand_max=10)
    problem = sample_problems("train", 1, cfg, seed=0)[0]
    right = problem.values()[2]  # the value after step 1
    lines = step_lines(problem, wrong_step=1, wrong_value=(right + 5) % cfg.modulus)
    tok = build_tokenizer()
    tok.save_pretrained(str(tmp_path))
    (tmp_path / META_FILE).write_text(
        json.dumps({"data": ["builtin:arith", "train", None, {"n_steps": 2, "modulus": 11}]})
    )
    rec = SolutionRecord(
        prompt_index=3,
        sample=0,
        prompt_ids=[tok.bos_token_id, *tok(problem.prompt + "\n").input_ids],
        response_ids=[5, 6, 7],
        step_ends=[0, 1, 2],
        labels=[0.5, 0.6, 0.1, 0.0],
        completion="\n".join(lines),
    )
    (tmp_path / "mc_data.rank0.jsonl").write_text(json.dumps(dataclasses.asdict(rec)) + "\n")
    labels = pl.read_labels(tmp_path)
    assert [(x.length, x.clean, x.q) for x in labels] == [
        (0, True, 0.5),
        (1, True, 0.6),
        (2, False, 0.1),
        (3, False, 0.0),
    ]
    text = pl.render(labels, "v")
    assert "| 1 | 0.600 (1) | - |" in text and "| 2 | - | 0.100 (1) |" in text
    assert "prompts (" not in text  # one prompt: no held-out half to score
