"""Tests for the outcome reward functions: built-in verifiers, resolution and validated scoring."""

from __future__ import annotations

import math
import sys
import textwrap
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rewards.base import RewardSpec, score_outcomes
from rewards.build import build_reward_fns, resolve_reward_fn
from rewards.verifiers import extract_final_answer, normalize_answer
from rl.core.errors import ConfigError, RewardError

# ---- built-in verifiers ----------------------------------------------------------------------


def test_extract_final_answer() -> None:
    assert extract_final_answer("so x = 2\n\\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_final_answer("Answer: 42\nthanks") == "42"
    assert extract_final_answer("work\nThe answer is 7.") == "7."
    assert extract_final_answer("step 1\n  12  \n\n") == "  12  "
    assert extract_final_answer("") == ""
    assert normalize_answer(" $1,000$. ") == "1000"
    assert normalize_answer("**Paris**") == "paris"


def test_exact_match() -> None:
    fn = resolve_reward_fn("exact_match")
    completions = ["Answer: 42", "thinking...\n41", "\\boxed{Paris}", "1,000.", "no"]
    gold = ["42", "42", "paris", "1000", "#### yes"]
    assert fn([""] * 5, completions, answer=gold) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert fn(["p"], ["so\nyes"], answer=["steps\n#### yes"]) == [1.0]


MATH_CASES = [
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The answer is \\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("The answer is \\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("so the total is 42", "42", 1.0),
    ("so the total is 41", "42", 0.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
    ("I don't know", "42", 0.0),
    ("", "42", 0.0),
]


def test_math_verify_hand_cases() -> None:
    fn = resolve_reward_fn("math_verify")
    completions, gold, expected = zip(*MATH_CASES, strict=True)
    assert fn([""] * len(gold), list(completions), answer=list(gold)) == list(expected)


def test_math_verify_off_main_thread() -> None:
    """math_verify's signal-based timeout fails off the main thread; we disable it there."""
    fn = resolve_reward_fn("math_verify")
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(fn(["p"], ["\\boxed{3}"], answer=["3"])))
    t.start()
    t.join()
    assert result == [[1.0]]


def test_arith_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_arith_reward(prompts: list[str], completions: list[str], answer: list[str], **kw: Any):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    fake = types.ModuleType("rl.tasks.arith")
    fake.arith_reward = fake_arith_reward  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rl.tasks.arith", fake)
    fn = resolve_reward_fn("arith")
    assert fn(["p", "p"], ["3", "4"], answer=["3", "3"]) == [1.0, 0.0]


# ---- resolution ------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "user_rewards_tmp"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            def length(prompts, completions, scale=1.0, **kw):
                return [scale * len(c) for c in completions]

            NOT_CALLABLE = 3

            class Holder:
                @staticmethod
                def one(prompts, completions, **kw):
                    return [1.0] * len(completions)
            """
        )
    )
    (tmp_path / "broken_rewards_tmp.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, "broken_rewards_tmp"):
        sys.modules.pop(mod, None)


def test_import_path_resolution(user_module: str) -> None:
    fn = resolve_reward_fn(f"{user_module}:length")
    assert fn(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    assert resolve_reward_fn(f"{user_module}:Holder.one")(["p"], ["x"]) == [1.0]


def test_kwargs_bound_with_partial(user_module: str) -> None:
    specs = [RewardSpec(f"{user_module}:length", weight=2.0, kwargs={"scale": 0.5})]
    total, per_fn = score_outcomes(build_reward_fns(specs), ["p", "p"], ["ab", "abcd"], {})
    assert per_fn[f"{user_module}:length"].tolist() == [1.0, 2.0]
    assert total.tolist() == [2.0, 4.0]


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("no_such_module_xyz.sub:fn", "no module named 'no_such_module_xyz.sub'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:NOT_CALLABLE", "is not callable"),
        ("broken_rewards_tmp:fn", "importing it failed: ModuleNotFoundError"),
        (":fn", "expected 'package.module:function'"),
    ],
)
def test_import_path_errors_name_the_spec(user_module: str, spec: str, pattern: str) -> None:
    spec = spec.format(mod=user_module)
    with pytest.raises(RewardError, match=pattern) as e:
        resolve_reward_fn(spec)
    assert repr(spec) in str(e.value) and "\n" not in str(e.value)


def test_unknown_registered_name_suggests_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'math_verify'"):
        resolve_reward_fn("math_verfy")


# ---- scoring ---------------------------------------------------------------------------------


def const(values: Any) -> Callable[..., Any]:
    return lambda prompts, completions, **kw: values


def score(fn: Callable[..., Any], n: int = 3, name: str = "my.mod:fn") -> Any:
    return score_outcomes([(RewardSpec(name), fn)], ["p"] * n, ["c"] * n, {"answer": ["a"] * n})


def test_weighted_total_and_per_function() -> None:
    seen: dict[str, Any] = {}

    def spy(prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        seen.update(kw)
        return [1.0, 0.0, 1.0]

    pairs = [
        (RewardSpec("a", weight=1.0), spy),
        (RewardSpec("b", weight=0.5), const(np.array([2.0, 4.0, 6.0]))),
        (RewardSpec("b", weight=-1.0), const(torch.tensor([1, 1, 1]))),
    ]
    cols: dict[str, list[Any]] = {"answer": ["x", "y", "z"], "completions": [0, 0, 0]}
    total, per_fn = score_outcomes(pairs, ["p"] * 3, ["c"] * 3, cols)
    assert total.dtype == torch.float32 and total.shape == (3,)
    assert total.tolist() == [1.0, 1.0, 3.0]
    assert set(per_fn) == {"a", "b", "b#2"}
    assert per_fn["b"].tolist() == [2.0, 4.0, 6.0]
    assert seen == {"answer": ["x", "y", "z"]}  # reserved names are not passed on


def test_bools_and_numpy_scalars_accepted() -> None:
    _, per_fn = score(const([True, np.float32(0.5), 2]))
    assert per_fn["my.mod:fn"].tolist() == [1.0, 0.5, 2.0]


def test_raising_function() -> None:
    def boom(prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        raise KeyError("answer")

    with pytest.raises(RewardError) as e:
        score(boom)
    assert str(e.value) == (
        "reward function 'my.mod:fn' raised KeyError: 'answer' on row 0, prompt 'p'"
    )
    assert isinstance(e.value.__cause__, KeyError)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (1.0, "reward function 'my.mod:fn' returned float, expected a list of 3 floats"),
        (None, "reward function 'my.mod:fn' returned NoneType, expected a list of 3 floats"),
        ("abc", "reward function 'my.mod:fn' returned str, expected a list of 3 floats"),
        ([1.0, 2.0], "reward function 'my.mod:fn' returned 2 values for 3 completions"),
        ([0.0, math.nan, 1.0], "reward function 'my.mod:fn' returned nan at index 1"),
        ([0.0, 1.0, math.inf], "reward function 'my.mod:fn' returned inf at index 2"),
        ([0.0, "1", 1.0], "reward function 'my.mod:fn' returned a non-number at index 1: str '1'"),
        ([0.0, 1.0, None], "reward function 'my.mod:fn' returned None at index 2"),
        (torch.zeros(3, 1), "reward function 'my.mod:fn' returned Tensor"),
    ],
)
def test_bad_return_values_name_the_function(values: Any, message: str) -> None:
    with pytest.raises(RewardError) as e:
        score(const(values))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_wrong_length_message_matches_brief() -> None:
    with pytest.raises(RewardError) as e:
        score(const([1.0] * 3), n=8)
    assert str(e.value) == "reward function 'my.mod:fn' returned 3 values for 8 completions"
