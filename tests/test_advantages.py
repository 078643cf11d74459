"""Hand-computed checks for the outcome-only advantage estimators and shape helpers."""

from __future__ import annotations

import math

import pytest
import torch

from rl.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    GRPO_EPS,
    dr_grpo,
    group_rewards,
    grpo,
    rloo,
    token_advantages,
)
from rl.core.errors import ConfigError


def test_grpo_by_hand() -> None:
    # rewards [1, 0, 0, 1]: mean 0.5; deviations +-0.5; unbiased var = 4 * 0.25 / 3 = 1/3,
    # std = 0.57735; advantages = +-0.5 / (0.57735 + 1e-4) = +-0.86588
    adv = grpo(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    a = 0.5 / (math.sqrt(1 / 3) + GRPO_EPS)
    assert a == pytest.approx(0.86588, abs=1e-5)
    torch.testing.assert_close(adv, torch.tensor([[a, -a, -a, a]]))


def test_grpo_second_group_and_equal_rewards() -> None:
    # group 0: [0, 1, 2] mean 1, unbiased var = (1 + 0 + 1) / 2 = 1, std 1 -> [-1, 0, 1]/(1+eps)
    # group 1: [3, 3, 3] std 0 -> all 0 (eps avoids 0/0)
    adv = grpo(torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]]))
    d = 1.0 + GRPO_EPS
    torch.testing.assert_close(adv, torch.tensor([[-1 / d, 0.0, 1 / d], [0.0, 0.0, 0.0]]))


def test_grpo_integer_rewards_promoted_and_k1_rejected() -> None:
    assert grpo(torch.tensor([[1, 0]])).dtype == torch.float32
    with pytest.raises(ConfigError, match="at least 2"):
        grpo(torch.tensor([[1.0], [0.0]]))


def test_dr_grpo_by_hand() -> None:
    # [1, 0, 0, 1] - 0.5 = [0.5, -0.5, -0.5, 0.5]; [2, 4] - 3 = [-1, 1]
    torch.testing.assert_close(
        dr_grpo(torch.tensor([[1.0, 0.0, 0.0, 1.0]])), torch.tensor([[0.5, -0.5, -0.5, 0.5]])
    )
    torch.testing.assert_close(dr_grpo(torch.tensor([[2.0, 4.0]])), torch.tensor([[-1.0, 1.0]]))
    # K = 1 is allowed: advantage 0
    torch.testing.assert_close(dr_grpo(torch.tensor([[5.0]])), torch.tensor([[0.0]]))


def test_rloo_k3_by_hand() -> None:
    # rewards [1, 2, 6]:
    #   i=0: 1 - (2 + 6)/2 = -3
    #   i=1: 2 - (1 + 6)/2 = -1.5
    #   i=2: 6 - (1 + 2)/2 = 4.5
    # (= K/(K-1) * (r - mean) = 1.5 * ([1, 2, 6] - 3))
    adv = rloo(torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-3.0, -1.5, 4.5], [0.0, 0.0, 0.0]]))


def test_rloo_k1_is_an_error() -> None:
    with pytest.raises(ConfigError, match="rloo"):
        rloo(torch.tensor([[1.0], [2.0]]))


def test_rloo_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.rand(3, 5, generator=g, dtype=torch.float64)
    expected = torch.empty_like(r)
    for p in range(3):
        for i in range(5):
            others = [r[p, j].item() for j in range(5) if j != i]
            expected[p, i] = r[p, i] - sum(others) / len(others)
    torch.testing.assert_close(rloo(r), expected)


def test_registry_lookup_and_unknown_name() -> None:
    assert ADVANTAGE_ESTIMATORS.names() == ["dr_grpo", "grpo", "rloo"]
    assert ADVANTAGE_ESTIMATORS.get("grpo") is grpo
    assert ADVANTAGE_ESTIMATORS.get("dr_grpo") is dr_grpo
    assert ADVANTAGE_ESTIMATORS.get("rloo") is rloo
    with pytest.raises(ConfigError, match="did you mean 'rloo'"):
        ADVANTAGE_ESTIMATORS.get("rlooo")
    with pytest.raises(ConfigError, match="advantage estimator"):
        ADVANTAGE_ESTIMATORS.get("ppo_gae_xyz")


def test_estimators_reject_non_2d() -> None:
    for name in ADVANTAGE_ESTIMATORS.names():
        with pytest.raises(ValueError, match="prompts, group_size"):
            ADVANTAGE_ESTIMATORS.get(name)(torch.tensor([1.0, 0.0]))


def test_group_rewards() -> None:
    # contiguous groups: [a0 a1 | b0 b1 | c0 c1] -> [[a0, a1], [b0, b1], [c0, c1]]
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    torch.testing.assert_close(
        group_rewards(r, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    )
    with pytest.raises(ValueError, match="not divisible by group_size=4"):
        group_rewards(r, 4)


def test_token_advantages_broadcast_with_mask() -> None:
    seq_adv = torch.tensor([2.0, -1.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]])
    expected = torch.tensor(
        [[2.0, 2.0, 2.0, 0.0], [0.0, -1.0, -1.0, 0.0], [0.5, 0.0, 0.0, 0.0]],
    )
    torch.testing.assert_close(token_advantages(seq_adv, mask), expected)
    # non-finite advantages do not leak into masked-out positions
    out = token_advantages(torch.tensor([float("inf")]), torch.tensor([[1, 0]]))
    assert out[0, 1].item() == 0.0
