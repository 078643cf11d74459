"""Hand-checked cases for the built-in modular-arithmetic chain task."""

from __future__ import annotations

import random

import pytest

from rl.core.errors import DataError
from rl.tasks import arith, builtin_rows
from rl.tasks.arith import (
    ArithConfig,
    ArithProblem,
    arith_reward,
    demonstration,
    first_error_step,
    parse_prompt,
    rows,
    sample_problems,
    slip,
    solution,
    split_of,
    verify,
)

# 3 +4 *2 -7 (mod 10): 3+4=7, 7*2=14->4, 4-7=-3->7
PROBLEM = ArithProblem(start=3, ops=("+", "*", "-"), operands=(4, 2, 7), modulus=10)
RIGHT = "3+4=7\n7*2=4\n4-7=7\nAnswer: 7"


def test_prompt_solution_and_parse() -> None:
    assert PROBLEM.prompt == "3 +4 *2 -7"
    assert PROBLEM.values() == [3, 7, 4, 7]
    assert solution(PROBLEM) == RIGHT
    assert parse_prompt("3 +4 *2 -7", modulus=10) == PROBLEM
    assert parse_prompt("3 +4 *2 -7", modulus=7).values() == [3, 0, 0, 0]
    with pytest.raises(ValueError):
        parse_prompt("3 + 4")


def test_verify() -> None:
    assert verify(RIGHT, "7") == 1.0
    assert verify(RIGHT + "\n", "7") == 1.0  # trailing newline tolerated
    assert verify("Answer: 7", "7") == 1.0  # outcome only: the steps are not checked
    assert verify(RIGHT, "8") == 0.0
    assert verify("3+4=7\n7*2=4\n4-7=7", "7") == 0.0  # no answer line
    assert verify("Answer: seven", "7") == 0.0
    assert verify("Answer: 7\nmore", "7") == 0.0  # answer must be on the last line
    assert verify("", "7") == 0.0
    assert verify("Answer: 7", "not a number") == 0.0


def test_arith_reward_trl_signature() -> None:
    out = arith_reward(
        prompts=["3 +4 *2 -7"] * 3,
        completions=[RIGHT, "Answer: 1", [{"role": "assistant", "content": "Answer: 7"}]],
        answer=["7", "7", "7"],
        trainer_state=None,
    )
    assert out == [1.0, 0.0, 1.0]


def test_first_error_step() -> None:
    assert first_error_step(PROBLEM, RIGHT) == -1
    assert first_error_step("3 +4 *2 -7", RIGHT, modulus=10) == -1  # prompt string
    assert first_error_step(PROBLEM, " 3+4=7 \n7*2=4\n4-7=7\nAnswer: 7\n") == -1
    assert first_error_step(PROBLEM, "3+4=8\n8*2=6\n6-7=9\nAnswer: 9") == 0  # step 0 wrong
    assert first_error_step(PROBLEM, "3+4=7\n7*2=5\n5-7=8\nAnswer: 8") == 1  # middle step
    assert first_error_step(PROBLEM, "3+4=7\n7*3=1\n1-7=4\nAnswer: 4") == 1  # wrong operand
    assert first_error_step(PROBLEM, "3+4=7\n7*2=4\n4-7=7\nAnswer: 8") == 3  # answer line
    assert first_error_step(PROBLEM, "3+4=7\n7*2=4") == 2  # missing lines
    assert first_error_step(PROBLEM, "3+4=7\n7*2=4\n4-7=7") == 3  # missing answer line
    assert first_error_step(PROBLEM, RIGHT + "\nAnswer: 7") == 4  # extra line
    assert first_error_step(PROBLEM, "") == 0
    assert first_error_step(PROBLEM, "%%garbage\n!!") == 0
    # a prompt string without a modulus is read with the default task's modulus (7)
    assert first_error_step("3 +4 *2 -7", "3+4=0\n0*2=0\n0-7=0\nAnswer: 0") == -1


def test_splits_disjoint_and_deterministic() -> None:
    cfg = ArithConfig()
    by_split = {s: rows(s, 300, cfg, seed=0) for s in ("train", "validation", "eval")}
    prompts = {s: {r["prompt"] for r in rs} for s, rs in by_split.items()}
    assert not prompts["train"] & prompts["eval"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["eval"]
    for split, rs in by_split.items():
        assert all(split_of(r["prompt"]) == split for r in rs)
        for r in rs:
            assert r["answer"] == str(parse_prompt(r["prompt"]).answer)
    # other seeds still never cross splits
    assert not {r["prompt"] for r in rows("train", 300, cfg, seed=5)} & prompts["eval"]
    assert rows("eval", 300, cfg, seed=0) == by_split["eval"]
    assert rows("eval", 50, cfg, seed=0) == by_split["eval"][:50]  # prefix-stable in n
    assert rows("eval", 50, cfg, seed=1) != by_split["eval"][:50]
    with pytest.raises(ValueError):
        rows("test", 1, cfg, seed=0)


def test_config_knobs() -> None:
    cfg = ArithConfig(n_steps=2, operand_max=20, modulus=7, ops="+")
    for p in sample_problems("train", 50, cfg, seed=0):
        assert len(p.ops) == 2 and set(p.ops) == {"+"}
        assert all(0 <= b <= 20 for b in p.operands) and 0 <= p.start < 7
    with pytest.raises(ValueError):
        ArithConfig(ops="/")


def test_demonstration_errors() -> None:
    cfg = ArithConfig()
    problems = sample_problems("train", 200, cfg, seed=3)
    rng = random.Random(0)
    with_mult = [p for p in problems if "*" in p.ops]
    assert 0 < len(with_mult) < len(problems)
    for p in problems:
        assert demonstration(p, rng, error_rate=0.0) == solution(p)
        bad = demonstration(p, rng, error_rate=1.0)
        if "*" not in p.ops:  # nothing to slip on: always right
            assert bad == solution(p)
            continue
        first = first_error_step(p, bad)
        assert first == p.ops.index("*")  # exactly one slip, on the first "*" step
        lines = bad.split("\n")
        assert len(lines) == cfg.n_steps + 1 and lines[-1].startswith("Answer: ")
        # the later steps continue consistently from the wrong value
        value = int(lines[first].split("=")[1])
        for line, op, b in zip(
            lines[first + 1 : -1], p.ops[first + 1 :], p.operands[first + 1 :], strict=True
        ):
            assert line.startswith(f"{value}{op}{b}=")
            value = int(line.split("=")[1])
        assert lines[-1] == f"Answer: {value}"


def test_slip_is_systematic() -> None:
    # 3 +4 *2 -7: the slip is on the first "*" step, computed as "+": 7+2 = 9
    assert slip(PROBLEM) == (1, 9)
    bad = demonstration(PROBLEM, random.Random(0), error_rate=1.0)
    assert bad == "3+4=7\n7*2=9\n9-7=2\nAnswer: 2"
    assert first_error_step(PROBLEM, bad) == 1 and verify(bad, "7") == 0.0
    # "*" as "+" would give the right value (2*2 = 2+2): the slip is right + 1
    same = ArithProblem(start=2, ops=("*",), operands=(2,), modulus=10)
    assert slip(same) == (0, 5)
    assert slip(ArithProblem(start=5, ops=("+", "-"), operands=(1, 2), modulus=10)) is None


def test_builtin_rows() -> None:
    got = builtin_rows("arith", "eval", 5, seed=0, n_steps=2)
    assert got == rows("eval", 5, ArithConfig(n_steps=2), seed=0)
    with pytest.raises(DataError, match="'gsm8k'.*arith"):
        builtin_rows("gsm8k", "train", 5, seed=0)


def test_demo_lines_with_the_slip_alone_is_the_old_demonstration() -> None:
    problems = arith.sample_problems("train", 300, arith.ArithConfig(), seed=0)
    for i, p in enumerate(problems):
        old = arith.demonstration(p, random.Random(i), 0.6)
        new = "\n".join(arith.demo_lines(p, random.Random(i), arith.DemoErrors(slip_rate=0.6)))
        assert new == old


def test_demo_errors_spread_and_stay_consistent() -> None:
    cfg = arith.ArithConfig(n_steps=8, modulus=10, operand_max=9)
    problems = arith.sample_problems("train", 2000, cfg, seed=0)
    rng = random.Random(0)
    errors = arith.DemoErrors(slip_rate=0.0, step_rate=0.1)
    first = []
    for p in problems:
        lines = arith.demo_lines(p, rng, errors)
        first.append(arith.first_error_step(p, "\n".join(lines)))
        a = p.start  # every line continues from the previous line's value
        for line, op, b in zip(lines, p.ops, p.operands, strict=False):
            assert line.startswith(f"{a}{op}{b}=")
            a = int(line.split("=")[1])
    wrong = [f for f in first if f >= 0]
    assert 1 - len(wrong) / len(first) == pytest.approx(0.9**8, abs=0.04)  # all 8 steps right
    assert set(wrong) >= set(range(8))  # first errors at every position


def test_misremembered_facts_are_fixed_per_fact() -> None:
    errors = arith.DemoErrors(slip_rate=0.0, fact_rate=0.3, fact_use=1.0, fact_seed=3)
    facts = [(a, op, b) for a in range(10) for op in "+-*" for b in range(10)]
    wrong = {f: arith.misremembered(*f, 10, errors) for f in facts}
    share = sum(v is not None for v in wrong.values()) / len(facts)
    assert share == pytest.approx(0.3, abs=0.06)
    for (a, op, b), value in wrong.items():
        assert value is None or value != arith.apply_op(a, op, b, 10)
    assert wrong == {f: arith.misremembered(*f, 10, errors) for f in facts}  # deterministic
    with pytest.raises(ValueError, match="fact_rate must be in"):
        arith.DemoErrors(fact_rate=1.5)


def test_operand_min_removes_the_reset_by_zero() -> None:
    cfg = ArithConfig(n_steps=8, modulus=11, operand_max=10, operand_min=1)
    problems = sample_problems("train", 200, cfg, seed=0)
    operands = [b for p in problems for b in p.operands]
    assert min(operands) == 1 and max(operands) == 10
    default = ArithConfig(n_steps=8, modulus=11, operand_max=10)
    assert min(b for p in sample_problems("train", 200, default, seed=0) for b in p.operands) == 0
    for bad in (-1, 11):
        with pytest.raises(ValueError, match="operand_min must be in 0..operand_max"):
            ArithConfig(operand_max=10, operand_min=bad)
