"""Synthetic wrong steps for PRM training (rl/prm/synthetic.py) against hand-built cases."""

from __future__ import annotations

import random

import pytest

from rl.prm.data import StepExample
from rl.prm.synthetic import CORRUPTIONS, corrupt_step, synthetic_negatives


def _example(prompt: str, steps: list[str], labels: list[bool]) -> StepExample:
    return StepExample(prompt, steps, labels, cost={"teacher_labels": len(steps), "mc_rollouts": 0})


def test_each_corruption_changes_the_step() -> None:
    rng = random.Random(0)
    repeated = corrupt_step("6+8=14", "repeat", rng, [])
    assert repeated is not None and repeated != "6+8=14"
    assert any(repeated == "6+8=14"[:k] * r for k in range(1, 7) for r in (2, 3)), repeated
    assert corrupt_step("6+8=14", "foreign", rng, ["6+8=14", "2*3=6"]) == "2*3=6"
    scrambled = corrupt_step("6+8=14", "scramble", rng, [])
    assert scrambled is not None and sorted(scrambled) == sorted("6+8=14")
    assert corrupt_step("6+8=14", "foreign", rng, ["6+8=14"]) is None  # nothing else to use
    assert corrupt_step("aa", "scramble", rng, []) is None  # no shuffle changes it
    with pytest.raises(ValueError, match="unknown corruption 'swap'"):
        corrupt_step("x", "swap", rng, [])


def test_synthetic_examples_end_at_one_corrupted_step() -> None:
    examples = [
        _example(f"p{i}", [f"s{i}a", f"s{i}b", f"s{i}c"], [True, True, i % 2 == 0])
        for i in range(10)
    ] + [_example("bad start", ["x", "y"], [False, False])]  # no right step: never used
    out = synthetic_negatives(examples, 0.5, seed=3)
    assert len(out) == round(0.5 * len(examples))
    for ex in out:
        source = next(e for e in examples if e.prompt == ex.prompt)
        h = len(ex.completions) - 1
        assert ex.prompt != "bad start"
        assert ex.labels == [True] * h + [False]
        assert source.labels[h]  # the replaced step was right in the source
        assert ex.completions[:h] == source.completions[:h]
        assert ex.completions[h] != source.completions[h]
        assert ex.cost == {"teacher_labels": 0, "mc_rollouts": 0}
        assert ex.extra["synthetic"] in CORRUPTIONS
        if ex.extra["synthetic"] == "foreign":  # from another prompt's solution
            owners = {e.prompt for e in examples if ex.completions[h] in e.completions}
            assert ex.prompt not in owners
    assert synthetic_negatives(examples, 0.5, seed=3) == out  # seeded
    assert synthetic_negatives(examples, 0.0, seed=3) == []
