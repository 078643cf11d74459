"""Reward functions that hang or raise: `reward.timeout_s`, `reward.on_error`, messages naming
the function and the row (issue 38)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rewards.base import CallPolicy, RewardSpec, score_outcomes_guarded
from rl.core.deadline import CallTimeout, call_with_timeout
from rl.core.errors import RewardCallError
from tests.reward_fns import fails_on_odd_length, sleep_forever

PROMPTS = ["q#0", "q#1", "q#2"]


def score(fn, policy: CallPolicy):  # type: ignore[no-untyped-def]
    pairs = [(RewardSpec("tests.reward_fns:f"), fn)]
    return score_outcomes_guarded(pairs, PROMPTS, ["ab", "b", "cd"], {}, policy)


def test_hung_function_raises_within_the_timeout() -> None:
    started = time.perf_counter()
    with pytest.raises(RewardCallError) as e:
        score(sleep_forever, CallPolicy(timeout_s=0.3, where="step 4, rank 1"))
    assert time.perf_counter() - started < 2.0
    assert str(e.value) == (
        "reward function 'tests.reward_fns:f' timed out after 0.3 s (reward.timeout_s) on "
        "rows 0-2 (step 4, rank 1), first prompt 'q#0'"
    )


def test_hung_function_scores_zero_under_zero_policy() -> None:
    total, per_fn, errors = score(sleep_forever, CallPolicy(timeout_s=0.2, on_error="zero"))
    assert total.tolist() == [0.0, 0.0, 0.0] and errors == 3


def test_raising_function_names_the_row() -> None:
    with pytest.raises(RewardCallError) as e:
        score(fails_on_odd_length, CallPolicy(timeout_s=5.0))
    assert str(e.value) == (
        "reward function 'tests.reward_fns:f' raised ValueError: cannot parse on row 1, "
        "prompt 'q#1'"
    )
    assert isinstance(e.value.__cause__, ValueError)


def test_zero_policy_zeroes_only_the_failing_row() -> None:
    total, per_fn, errors = score(fails_on_odd_length, CallPolicy(on_error="zero"))
    assert total.tolist() == [1.0, 0.0, 1.0]
    assert per_fn["tests.reward_fns:f"].tolist() == [1.0, 0.0, 1.0]
    assert errors == 1


def test_no_timeout_calls_inline_and_worker_keeps_grad_mode() -> None:
    assert call_with_timeout(threading.current_thread, None) is threading.current_thread()
    with torch.no_grad():
        assert call_with_timeout(torch.is_grad_enabled, 1.0) is False
    assert call_with_timeout(torch.is_grad_enabled, 1.0) is True
    with pytest.raises(CallTimeout):
        call_with_timeout(time.sleep, 0.05, 2.0)
