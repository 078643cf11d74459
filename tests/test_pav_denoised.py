"""benchmarks/pav_denoised.py: the (prefix length, clean) group means and the rewritten labels,
and that the held-out prompts keep their Monte-Carlo labels."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks import pav_denoised as pd
from rl.data.prompts import val_prompt_set
from rl.engine.start_model import build_tokenizer
from rl.pav.data import META_FILE, SolutionRecord, read_records
from rl.tasks.arith import ArithConfig, sample_problems, step_lines


def record(prompt_index: int, labels: list[float], **kw: object) -> SolutionRecord:
    fields: dict = dict(
        prompt_index=prompt_index,
        sample=0,
        prompt_ids=[1],
        response_ids=[5, 6, 7],
        step_ends=[0, 1, 2],
        labels=labels,
        completion="",
    )
    return SolutionRecord(**(fields | kw))


def test_group_means_skip_the_outcome_label() -> None:
    a = record(0, [0.2, 0.6, 0.0, 1.0])
    b = record(1, [0.4, 0.1, 0.3, 0.0])
    clean = {(0, 0): [True, True, False, False], (1, 0): [True, False, False, False]}
    means = pd.group_means([a, b], clean)
    # prefix 0 clean: (0.2 + 0.4) / 2; 1 clean: 0.6; 1 broken: 0.1; 2 broken: (0.0 + 0.3) / 2
    assert means == pytest.approx(
        {(0, True): 0.3, (1, True): 0.6, (1, False): 0.1, (2, False): 0.15}
    )
    assert (3, False) not in means  # the last label is each solution's outcome


def test_new_labels_keep_the_outcome() -> None:
    means = {(0, True): 0.3, (1, True): 0.6, (1, False): 0.1, (2, False): 0.15}
    flags = [True, False, False, False]
    assert pd.new_labels([0.9, 0.9, 0.9, 1.0], flags, means, "length_clean") == [
        0.3,
        0.1,
        0.15,
        1.0,
    ]
    assert pd.new_labels([0.9, 0.9, 0.9, 0.0], flags, means, "clean") == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="--targets"):
        pd.new_labels([0.5, 1.0], [True, True], means, "exact")


def test_main_relabels_training_prompts_only(tmp_path: Path) -> None:
    cfg = ArithConfig(n_steps=2, modulus=11, operand_max=10)
    tok = build_tokenizer()
    src = tmp_path / "verifier"
    tok.save_pretrained(str(src))
    (src / META_FILE).write_text(
        json.dumps({"data": ["builtin:arith", "train", None, {"n_steps": 2, "modulus": 11}]})
    )
    rows = []
    for i, problem in enumerate(sample_problems("train", 10, cfg, seed=0)):
        right = problem.values()[1]  # the value after step 0
        wrong = i % 2 == 1  # odd prompts go wrong at step 0
        wrong_step = 0 if wrong else -1
        text = "\n".join(step_lines(problem, wrong_step, wrong_value=(right + 3) % 11))
        ids = [tok.bos_token_id, *tok(problem.prompt + "\n").input_ids]
        rows.append(
            record(i, [0.5, 0.25 * (i % 3), 0.5, float(not wrong)], prompt_ids=ids, completion=text)
        )
    (src / "mc_data.rank0.jsonl").write_text(
        "".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows)
    )
    out = tmp_path / "out"
    assert pd.main([str(src), str(out), "--targets", "clean", "--val-fraction", "0.2"]) == 0
    val = val_prompt_set(range(10), 0.2, 0)
    assert len(val) == 2
    got = {r.prompt_index: r.labels for r in read_records(out.glob("mc_data.rank*.jsonl"))}
    for r in rows:
        if r.prompt_index % 2:
            assert got[r.prompt_index] == [1.0, 0.0, 0.0, 0.0]
        else:
            assert got[r.prompt_index] == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(SystemExit, match="already holds"):
        pd.main([str(src), str(out)])
    # length_clean: the held-out prompts keep their Monte-Carlo labels
    out = tmp_path / "out_lc"
    assert pd.main([str(src), str(out), "--val-fraction", "0.2"]) == 0
    got = {r.prompt_index: r.labels for r in read_records(out.glob("mc_data.rank*.jsonl"))}
    train = [r for r in rows if r.prompt_index not in val]
    # prefix 1 broken (odd training prompts): the mean of their labels 0.25 * (i % 3)
    broken_1 = [0.25 * (r.prompt_index % 3) for r in train if r.prompt_index % 2]
    for r in rows:
        if r.prompt_index in val:
            assert got[r.prompt_index] == r.labels
        elif r.prompt_index % 2:
            assert got[r.prompt_index][1] == pytest.approx(sum(broken_1) / len(broken_1))
            assert got[r.prompt_index][3] == 0.0
