"""Numerical edge cases of the maths (issue 38): all-equal groups get exactly zero advantage,
log-ratios are clamped before exp, and metrics mark non-finite values instead of nulling them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rl.algos.advantages import ADVANTAGE_ESTIMATORS, zero_flat_groups
from rl.algos.losses import LOG_RATIO_CLAMP, clipped_surrogate, k3_kl, policy_loss, safe_ratio
from rl.trainer.metrics import MetricsLogger, decode_value, encode_value, read_metrics_file


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value", [0.3, 0.1, 1.0 / 3.0, 7.7, 0.0])
def test_all_equal_group_gets_exactly_zero(name: str, value: float) -> None:
    # float32 mean of eight 0.3s is 0.30000001 (one ulp off); before the fix grpo gave
    # (0.3 - mean) / (0 + 1e-4) = -6e-4 per sample instead of 0
    rewards = torch.full((2, 8), value, dtype=torch.float32)
    rewards[1] = torch.tensor([0.0, 1.0] * 4)  # a second, informative group is untouched
    adv = ADVANTAGE_ESTIMATORS.get(name)(rewards)
    assert torch.equal(adv[0], torch.zeros(8)), adv[0]
    assert adv[1].abs().min() > 0.1


def test_float32_mean_of_equal_values_is_off_by_an_ulp() -> None:
    """Why the explicit zero is needed: the plain formula is not 0 for these rewards."""
    r = torch.full((1, 8), 0.3)
    naive = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)
    assert naive.abs().max() > 1e-4


def test_zero_flat_groups_keeps_nan_groups_visible() -> None:
    rewards = torch.tensor([[1.0, 1.0], [float("nan"), float("nan")]])
    adv = zero_flat_groups(torch.tensor([[0.5, 0.5], [2.0, 2.0]]), rewards)
    assert adv[0].tolist() == [0.0, 0.0]
    assert adv[1].tolist() == [2.0, 2.0]  # NaN != NaN: not flat, left for the NaN guard


def test_safe_ratio_unchanged_within_twenty_and_finite_beyond() -> None:
    x = torch.tensor([-20.0, -3.5, 0.0, 1e-3, 19.99, 20.0], dtype=torch.float64)
    assert torch.equal(safe_ratio(x), torch.exp(x))
    big = torch.tensor([89.0, 1000.0, float("inf"), -float("inf")])
    out = safe_ratio(big)
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx(
        [math.exp(20), math.exp(20), math.exp(20), math.exp(-20)], rel=1e-6
    )
    assert LOG_RATIO_CLAMP == 20.0


def test_surrogate_gradient_unchanged_within_clamp() -> None:
    # rho = e^0.1 = 1.10517 < 1 + 0.28, A = 2 -> loss = -rho A, d/dlogp = -rho A
    logp = torch.tensor([[0.1]], dtype=torch.float64, requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 1, dtype=torch.float64),
                                torch.tensor([[2.0]], dtype=torch.float64), 0.2, 0.28)  # fmt: skip
    loss.sum().backward()
    assert logp.grad is not None
    assert float(logp.grad) == pytest.approx(-2 * math.exp(0.1), rel=1e-12)


def test_one_infinite_log_ratio_no_longer_spoils_the_step() -> None:
    # old log-prob -inf (an engine row gone wrong): log-ratio +inf. Unclamped, exp gives inf
    # and the loss (and its gradient) inf/NaN; clamped, that token is simply clipped.
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-float("inf"), -2.0]])
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, old, None, adv, mask, clip_low=0.2, clip_high=0.28,
                              kl_coef=0.0, mode="token_mean", global_tokens=2.0,
                              global_seqs=1.0)  # fmt: skip
    loss.backward()
    assert logp.grad is not None
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    # token 0 is clipped at 1.28 * A = 1.28 (no gradient); token 1: rho 1, A -1 -> +1
    assert loss.item() == pytest.approx((-1.28 + 1.0) / 2)
    assert float(stats["clip_frac"]) == pytest.approx(0.5)
    with torch.no_grad():
        unclamped = torch.exp(logp - old) * adv
    assert not torch.isfinite(unclamped).all()  # what the old formula computed


def test_k3_clamped_beyond_twenty_only() -> None:
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[1.5, 500.0]], dtype=torch.float64)
    kl = k3_kl(logp, ref)
    assert float(kl[0, 0]) == pytest.approx(math.exp(1.5) - 1.5 - 1)
    assert float(kl[0, 1]) == pytest.approx(math.exp(20) - 20 - 1)


def test_metrics_mark_non_finite_values(tmp_path: Path) -> None:
    assert encode_value(float("nan")) == "NaN"
    assert encode_value(float("inf")) == "Infinity"
    assert encode_value(-float("inf")) == "-Infinity"
    assert encode_value(1.5) == 1.5 and encode_value("x") == "x"
    assert math.isnan(decode_value("NaN")) and decode_value("-Infinity") == -math.inf
    logger = MetricsLogger(tmp_path, use_wandb=False, project="p", run_name="r", config={})
    logger.log({"step": 1, "train/grad_norm": float("nan"), "train/loss": float("inf")})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    raw = json.loads(line)  # strict JSON: no bare NaN tokens, no null
    assert raw["train/grad_norm"] == "NaN" and raw["train/loss"] == "Infinity"
    (row,) = read_metrics_file(tmp_path / "metrics.jsonl")
    assert math.isnan(row["train/grad_norm"]) and row["train/loss"] == math.inf


def test_finite_adamw_skips_a_non_finite_step() -> None:
    """Without ZeRO DeepSpeed calls the torch optimizer on any gradient; this one refuses a
    NaN and says so in `overflow`, which DeepSpeed reads to count the step as skipped."""
    from rl.engine.deepspeed_engine import FiniteAdamW

    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = FiniteAdamW(model.parameters(), lr=0.1)
    model(torch.tensor([[1.0, float("nan")]])).sum().backward()
    opt.step()
    assert opt.overflow
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    opt.zero_grad()
    model(torch.tensor([[1.0, 2.0]])).sum().backward()
    opt.step()
    assert not opt.overflow
    assert not torch.equal(model.weight, before[0])
