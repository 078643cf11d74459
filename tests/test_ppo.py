"""Hand-computed checks for PPO's GAE, returns, whitening, value loss and token rewards.

GAE recursion used in the comments: `delta_t = r_t + gamma V_{t+1} - V_t` (V after the last
valid token = 0), `A_t = delta_t + gamma lam A_{t+1}`, `R_t = A_t + V_t`.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from rl.algos.credit import sum_form_returns
from rl.algos.ppo import (
    clipped_value_loss,
    dense_token_rewards,
    gae,
    last_valid_index,
    masked_moments,
    whiten,
)

F64 = torch.float64
NAN = float("nan")


def t64(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------- GAE by hand


def test_gae_outcome_on_last_token_by_hand() -> None:
    # gamma = 0.5, lam = 0.5 -> gamma lam = 0.25;  r = [0, 0, 1], V = [0.5, 0.6, 0.8]
    #   delta_2 = 1 + 0.5*0   - 0.8 =  0.2
    #   delta_1 = 0 + 0.5*0.8 - 0.6 = -0.2
    #   delta_0 = 0 + 0.5*0.6 - 0.5 = -0.2
    #   A_2 = 0.2;  A_1 = -0.2 + 0.25*0.2 = -0.15;  A_0 = -0.2 + 0.25*(-0.15) = -0.2375
    #   R = A + V = [0.2625, 0.45, 1.0]   (R_2 = r_2: terminal)
    adv, ret = gae(t64([[0, 0, 1]]), t64([[0.5, 0.6, 0.8]]), torch.ones(1, 3), 0.5, 0.5)
    torch.testing.assert_close(adv, t64([[-0.2375, -0.15, 0.2]]))
    torch.testing.assert_close(ret, t64([[0.2625, 0.45, 1.0]]))


def test_gae_process_reward_mid_sequence_by_hand() -> None:
    # as above but a process reward 0.5 on token 1: r = [0, 0.5, 1]
    #   delta_1 = 0.5 + 0.5*0.8 - 0.6 = 0.3   (delta_0 = -0.2, delta_2 = 0.2 unchanged)
    #   A_2 = 0.2;  A_1 = 0.3 + 0.25*0.2 = 0.35;  A_0 = -0.2 + 0.25*0.35 = -0.1125
    #   R = [0.3875, 0.95, 1.0]
    adv, ret = gae(t64([[0, 0.5, 1]]), t64([[0.5, 0.6, 0.8]]), torch.ones(1, 3), 0.5, 0.5)
    torch.testing.assert_close(adv, t64([[-0.1125, 0.35, 0.2]]))
    torch.testing.assert_close(ret, t64([[0.3875, 0.95, 1.0]]))


def test_gae_padding_by_hand_garbage_ignored() -> None:
    # row 0: length 3, as in the first test; row 1: length 2, r = [0, 1], V = [0.4, 0.7]
    #   delta_1 = 1 + 0.5*0 - 0.7 = 0.3   (the padded V is NOT the next value: terminal 0)
    #   delta_0 = 0 + 0.5*0.7 - 0.4 = -0.05
    #   A_1 = 0.3;  A_0 = -0.05 + 0.25*0.3 = 0.025;  R = [0.425, 1.0]; pad -> 0
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected_adv = t64([[-0.2375, -0.15, 0.2], [0.025, 0.3, 0.0]])
    expected_ret = t64([[0.2625, 0.45, 1.0], [0.425, 1.0, 0.0]])
    for pad_r, pad_v in [(0.0, 0.0), (1e6, NAN), (NAN, -1e6), (math.inf, math.inf)]:
        rewards = t64([[0, 0, 1], [0, 1, pad_r]])
        values = t64([[0.5, 0.6, 0.8], [0.4, 0.7, pad_v]])
        adv, ret = gae(rewards, values, mask, 0.5, 0.5)
        torch.testing.assert_close(adv, expected_adv)
        torch.testing.assert_close(ret, expected_ret)
    # row 1 on its own (T = 2, no padding) gives the same numbers
    adv1, ret1 = gae(t64([[0, 1]]), t64([[0.4, 0.7]]), torch.ones(1, 2), 0.5, 0.5)
    torch.testing.assert_close(adv1, expected_adv[1:, :2])
    torch.testing.assert_close(ret1, expected_ret[1:, :2])


# ---------------------------------------------------------------- GAE identities


def _random_batch(seed: int, b: int = 5, t: int = 7) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Random rewards/values with garbage (NaN, huge) in the right padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 1, 4, 0, 6][:b]
    mask = (torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()  # [B, T]
    rewards = torch.randn(b, t, generator=g, dtype=F64)
    values = torch.randn(b, t, generator=g, dtype=F64)
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e9))
    values = torch.where(mask.bool(), values, torch.full_like(values, NAN))
    return rewards, values, mask, lengths


def _naive_gae(
    rewards: Tensor, values: Tensor, lengths: list[int], gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Per-sequence python reference, straight from the sum formula."""
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        r = rewards[b, :n].tolist()
        v = values[b, :n].tolist() + [0.0]  # terminal value 0
        delta = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            a = sum((gamma * lam) ** (s - t) * delta[s] for s in range(t, n))
            adv[b, t] = a
            ret[b, t] = a + v[t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.7, 0.0), (1.0, 0.5)])
def test_gae_matches_naive_reference(gamma: float, lam: float) -> None:
    rewards, values, mask, lengths = _random_batch(seed=1)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_gae_gamma1_lam1_is_returns_minus_values() -> None:
    # lam = gamma = 1: A_t = sum_{s>=t} r_s - V_t (the V terms telescope, V_end = 0)
    rewards, values, mask, _ = _random_batch(seed=2)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    mc = sum_form_returns(torch.where(mask.bool(), rewards, 0.0), mask, 1.0)
    m = mask.bool()
    torch.testing.assert_close(adv[m], (mc - values)[m])
    torch.testing.assert_close(ret, mc)
    assert (adv[~m] == 0).all()


def test_gae_lam0_is_one_step_td() -> None:
    # lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t, with V_{t+1} = 0 after the last token
    rewards, values, mask, lengths = _random_batch(seed=3)
    gamma = 0.8
    adv, ret = gae(rewards, values, mask, gamma, 0.0)
    m = mask.bool()
    next_v = torch.cat([values[:, 1:], torch.zeros(values.shape[0], 1, dtype=F64)], dim=1)
    next_v = torch.where(torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1), next_v, 0.0)
    td = rewards + gamma * next_v - values  # [B, T]
    torch.testing.assert_close(adv[m], td[m])
    torch.testing.assert_close(ret[m], (rewards + gamma * next_v)[m])  # R = r + gamma V'


def test_monte_carlo_returns_by_hand_and_vs_gae() -> None:
    # gamma = 0.5, r = [1, 0, 2] -> R_2 = 2, R_1 = 0 + 0.5*2 = 1, R_0 = 1 + 0.5*1 = 1.5
    # row 1 (length 2): r = [3, 4] -> R = [3 + 0.5*4, 4] = [5, 4]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = sum_form_returns(t64([[1, 0, 2], [3, 4, 0]]), mask, 0.5)
    torch.testing.assert_close(got, t64([[1.5, 1.0, 2.0], [5.0, 4.0, 0.0]]))
    # on right-padded masks GAE with lam = 1 and V = 0 returns the same
    rewards, _, mask, _ = _random_batch(seed=4)
    rewards = torch.where(mask.bool(), rewards, 0.0)
    _, returns = gae(rewards, torch.zeros_like(rewards), mask, 0.9, 1.0)
    torch.testing.assert_close(returns, sum_form_returns(rewards, mask, 0.9))


def test_gae_skips_masked_holes_and_is_detached() -> None:
    # a hole at column 1 (e.g. a tool output): [r=1, V=0.5] [hole] [r=2, V=1.0], gamma = lam = 1
    #   A_2 = 2 - 1.0 = 1.0;  delta_0 = 1 + 1.0 - 0.5 = 1.5;  A_0 = 1.5 + 1.0 = 2.5
    # = the same as the 2-token sequence without the hole
    values = t64([[0.5, NAN, 1.0]]).requires_grad_(True)
    adv, ret = gae(t64([[1, 7, 2]]), values, torch.tensor([[1, 0, 1]]), 1.0, 1.0)
    torch.testing.assert_close(adv, t64([[2.5, 0.0, 1.0]]))
    torch.testing.assert_close(ret, t64([[3.0, 0.0, 2.0]]))
    assert not adv.requires_grad and not ret.requires_grad
    # float32 inputs -> float32 outputs; bf16 is upcast to float32
    a32, _ = gae(torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(1, 2), torch.ones(1, 2), 1, 1)
    assert a32.dtype == torch.float32


# ---------------------------------------------------------------- whitening


def test_whiten_by_hand() -> None:
    # x = [1, 3, 5] (+ NaN pad): mean 3, unbiased var ((-2)^2 + 0 + 2^2) / 2 = 4, std 2
    #   shift_mean: [-1, 0, 1];  no shift: [-1, 0, 1] + 3 = [2, 3, 4]
    x = t64([[1, 3, 5, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_moments(x, mask) == (9.0, 35.0, 3.0)  # 1+3+5, 1+9+25, 3
    torch.testing.assert_close(whiten(x, mask), t64([[-1, 0, 1, 0]]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), t64([[2, 3, 4, 0]]))
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.tensor([[1, 0, 0, 0]]))


def test_whiten_global_stats_equal_concatenated_batch() -> None:
    # two "ranks" with different row counts and lengths; summing their moments (the caller's
    # all-reduce) and whitening each part with them equals whitening the concatenated batch
    x, _, mask, _ = _random_batch(seed=5)  # garbage (1e9) at padded positions
    parts = [slice(0, 2), slice(2, 5)]
    moments = [masked_moments(x[p], mask[p]) for p in parts]
    total = (
        sum(mm[0] for mm in moments),
        sum(mm[1] for mm in moments),
        sum(mm[2] for mm in moments),
    )
    for shift in (True, False):
        full = whiten(x, mask, shift_mean=shift)
        split = torch.cat([whiten(x[p], mask[p], shift, global_stats=total) for p in parts])
        torch.testing.assert_close(split, full)
        m = mask.bool()
        assert abs(full[m].std().item() - 1.0) < 1e-6 and (full[~m] == 0).all()
    # each part whitened with its own moments is different
    local = torch.cat([whiten(x[p], mask[p]) for p in parts])
    assert not torch.allclose(local, whiten(x, mask))


# ---------------------------------------------------------------- value loss


def test_clipped_value_loss_by_hand() -> None:
    # clip c = 0.2; R = 2.0 everywhere; column 3 is padding with garbage
    #   V    V_old  clip(V)  (V-R)^2  (clip(V)-R)^2  max/2   clipped?  dvf/dV
    #   1.5  1.0    1.2      0.25     0.64           0.32    yes       0 (clamped)
    #   0.5  1.0    0.8      2.25     1.44           1.125   no        V - R = -1.5
    #   1.1  1.0    1.1      0.81     0.81           0.405   no        V - R = -0.9
    # token_mean over 3 tokens: (0.32 + 1.125 + 0.405) / 3 = 1.85 / 3
    values = t64([[1.5, 0.5, 1.1, NAN]]).requires_grad_(True)
    old = t64([[1.0, 1.0, 1.0, math.inf]])
    ret = t64([[2.0, 2.0, 2.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = clipped_value_loss(values, old, ret, mask, 0.2, "token_mean", 3.0, 1.0)
    torch.testing.assert_close(loss, torch.tensor(1.85 / 3, dtype=F64))
    torch.testing.assert_close(stats["vf_loss"], torch.tensor(1.85 / 3, dtype=F64))
    torch.testing.assert_close(stats["vf_clip_frac"], torch.tensor(1 / 3, dtype=F64))
    torch.testing.assert_close(stats["vf_mse"], torch.tensor(3.31 / 3, dtype=F64))  # .25+2.25+.81
    torch.testing.assert_close(stats["value_mean"], torch.tensor(3.1 / 3, dtype=F64))
    torch.testing.assert_close(stats["return_mean"], torch.tensor(2.0, dtype=F64))
    loss.backward()
    assert values.grad is not None
    # d/dV of max/2 / 3: [0, -1.5/3, -0.9/3, 0]
    torch.testing.assert_close(values.grad, t64([[0.0, -0.5, -0.3, 0.0]]))


def test_clipped_value_loss_single_cases_and_modes() -> None:
    # the brief's case: V=1.5, V_old=1.0, R=2.0, c=0.2 -> max(0.25, 0.64)/2 = 0.32, clipped
    one = torch.ones(1, 1)
    loss, stats = clipped_value_loss(
        torch.tensor([[1.5]]), one, torch.tensor([[2.0]]), one, 0.2, "token_mean", 1.0, 1.0
    )
    torch.testing.assert_close(loss, torch.tensor(0.32))
    assert stats["vf_clip_frac"].item() == 1.0
    # unclipped dominates: V=0.5 -> max(2.25, 1.44)/2 = 1.125, not counted as clipped
    loss, stats = clipped_value_loss(
        torch.tensor([[0.5]]), one, torch.tensor([[2.0]]), one, 0.2, "token_mean", 1.0, 1.0
    )
    torch.testing.assert_close(loss, torch.tensor(1.125))
    assert stats["vf_clip_frac"].item() == 0.0
    # seq_mean: rows [0.32, 1.125] (len 2) and [0.405] (len 1): (0.7225 + 0.405) / 2 seqs
    v = torch.tensor([[1.5, 0.5], [1.1, 0.0]])
    old = torch.ones(2, 2)
    ret = torch.full((2, 2), 2.0)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = clipped_value_loss(v, old, ret, mask, 0.2, "seq_mean", 3.0, 2.0)
    torch.testing.assert_close(loss, torch.tensor((0.7225 + 0.405) / 2))
    # clip = inf: plain (V - R)^2 / 2 -> (0.25 + 2.25 + 0.81) / 2 / 3 tokens
    loss, stats = clipped_value_loss(v, old, ret, mask, math.inf, "token_mean", 3.0, 2.0)
    torch.testing.assert_close(loss, torch.tensor(3.31 / 6))
    assert stats["vf_clip_frac"].item() == 0.0
    with pytest.raises(ValueError, match="clip"):
        clipped_value_loss(v, old, ret, mask, -0.1, "token_mean", 3.0, 2.0)


# ---------------------------------------------------------------- token rewards


def test_dense_token_rewards_by_hand() -> None:
    # row 0: length 3, outcome 1 on column 2; row 1: length 4, outcome 0 on column 3
    # kl_coef 0.1:
    #   row 0: [0.1 - 0.1*0.5, 0 - 0.1*1.0, 1 + 0.2 - 0, pad]   = [0.05, -0.1, 1.2, 0]
    #   row 1: [0 - 0.02, 0.3 - 0.02, 0 - 0.02, 0 - 0.4 - 0.02] = [-0.02, 0.28, -0.02, -0.42]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    outcome = t64([[1.0, 0.0]])[0]
    last = torch.tensor([2, 3])
    assert last_valid_index(mask).tolist() == [2, 3]
    step = t64([[0.1, 0, 0.2, 99.0], [0, 0.3, 0, -0.4]])
    kl = t64([[0.5, 1.0, 0.0, NAN], [0.2, 0.2, 0.2, 0.2]])
    got = dense_token_rewards(outcome, last, step, kl, 0.1, mask)
    torch.testing.assert_close(got, t64([[0.05, -0.1, 1.2, 0.0], [-0.02, 0.28, -0.02, -0.42]]))
    # outcome only
    got = dense_token_rewards(outcome, last, None, None, 0.0, mask)
    torch.testing.assert_close(got, t64([[0, 0, 1, 0], [0, 0, 0, 0]]))
    # gae with gamma = lam = 1, V = 0: A_0 = outcome + sum of process rewards - kl
    adv, _ = gae(dense_token_rewards(outcome, last, step, None, 0.0, mask), 0 * step, mask, 1, 1)
    torch.testing.assert_close(adv[:, 0], t64([[1.3, -0.1]])[0])  # 1+0.1+0.2, 0.3-0.4
    # an empty row drops its outcome; any index is accepted there
    empty = torch.tensor([[1, 0], [0, 0]])
    got = dense_token_rewards(torch.tensor([2.0, 5.0]), torch.tensor([0, -1]), None, None, 0, empty)
    torch.testing.assert_close(got, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))


def test_dense_token_rewards_errors() -> None:
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="last response token"):
        dense_token_rewards(torch.tensor([1.0]), torch.tensor([2]), None, None, 0.0, mask)
    with pytest.raises(ValueError, match="kl_coef"):
        dense_token_rewards(torch.tensor([1.0]), torch.tensor([1]), None, None, 0.1, mask)
    with pytest.raises(ValueError, match="step_rewards"):
        dense_token_rewards(
            torch.tensor([1.0]), torch.tensor([1]), torch.zeros(1, 2), None, 0, mask
        )
