"""Hand-computed checks for the policy losses, and split-invariance of the aggregation.

The split-invariance test reproduces what DeepSpeed does with a micro-batch loss
(`engine.backward` divides it by gradient_accumulation_steps; ZeRO averages the accumulated
gradients over data-parallel ranks) and checks that the sum-form aggregation times
`engine_loss_scale` gives the exact gradient of the global-batch mean, while a naive
per-micro-batch mean does not.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from rl.algos.advantages import group_rewards, grpo, token_advantages
from rl.algos.losses import (
    AggregationMode,
    aggregate_loss,
    clipped_surrogate,
    engine_loss_scale,
    k3_kl,
    masked_sum,
    policy_loss,
    token_entropy,
    token_logprobs,
)
from rl.core.errors import ConfigError

# ---------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_by_hand() -> None:
    # clip_low 0.2 -> lower bound 0.8; clip_high 0.28 -> upper bound 1.28
    #   rho  A    rho*A   clip(rho)*A   -min           clipped?
    #   1.5 +1    1.5     1.28          -1.28          yes (A>0, rho>1.28)
    #   0.5 +1    0.5     0.8           -0.5           no
    #   0.5 -1   -0.5    -0.8           +0.8           yes (A<0, rho<0.8)
    #   1.5 -1   -1.5    -1.28          +1.5           no
    #   1.1 +2    2.2     2.2           -2.2           no (inside the range)
    #   1.0  0    0       0              0             no
    rho = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 0.0]], dtype=torch.float64)
    old = torch.full_like(rho, -0.7)
    logp = (old + rho.log()).requires_grad_(True)
    loss, clipped = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(
        loss, torch.tensor([[-1.28, -0.5, 0.8, 1.5, -2.2, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        clipped, torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    )
    # d loss / d logp = -rho*A where unclipped, 0 where clipped
    loss.sum().backward()
    assert logp.grad is not None
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.0, -0.5, 0.0, 1.5, -2.2, 0.0]], dtype=torch.float64)
    )


def test_k3_kl_by_hand() -> None:
    # d = ref - logp;  k3 = e^d - d - 1
    #   d = 0     -> 1 - 0 - 1 = 0
    #   d = 1     -> e - 2 = 0.718282
    #   d = -1    -> 1/e + 1 - 1 = 0.367879
    #   d = ln 2  -> 2 - 0.693147 - 1 = 0.306853
    logp = torch.tensor([[0.3, 0.0, 1.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.3, 1.0, 0.0, math.log(2)]], dtype=torch.float64)
    torch.testing.assert_close(
        k3_kl(logp, ref),
        torch.tensor([[0.0, math.e - 2, math.exp(-1), 1 - math.log(2)]], dtype=torch.float64),
    )


# ---------------------------------------------------------------- log-probs and entropy


def test_token_logprobs_and_entropy_by_hand() -> None:
    # logits [0, ln 3] -> softmax [1/4, 3/4]; logp(id 1) = ln 0.75, logp(id 0) = ln 0.25
    # entropy = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335; uniform over 4 -> ln 4
    logits = torch.tensor([[[0.0, math.log(3), -math.inf, -math.inf], [0.0, 0.0, 0.0, 0.0]]])
    ids = torch.tensor([[1, 2]])
    torch.testing.assert_close(
        token_logprobs(logits, ids), torch.tensor([[math.log(0.75), math.log(0.25)]])
    )
    # temperature 2 on [0, 2 ln 3] gives back [0, ln 3]
    hot = torch.tensor([[[0.0, 2 * math.log(3)]]])
    torch.testing.assert_close(
        token_logprobs(hot, torch.tensor([[0]]), temperature=2.0),
        torch.tensor([[math.log(0.25)]]),
    )
    ent = token_entropy(torch.tensor([[[0.0, math.log(3)], [1.0, 1.0]]]))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(ent, torch.tensor([[expected, math.log(2)]]))


def test_token_logprobs_matches_naive_and_upcasts_bf16() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    naive = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids), naive)
    out = token_logprobs(logits.bfloat16(), ids)
    assert out.dtype == torch.float32
    p = logits.softmax(-1)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1))


# ---------------------------------------------------------------- aggregation


def test_masked_sum_ignores_masked_nan() -> None:
    x = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    assert masked_sum(x, torch.tensor([[1, 0], [1, 1]])).item() == 6.0


def test_aggregate_loss_by_hand() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # token_mean: (1 + 2 + 4) / global_tokens = 7 / 10
    got = aggregate_loss(loss, mask, "token_mean", global_tokens=10.0, global_seqs=99.0)
    torch.testing.assert_close(got, torch.tensor(0.7))
    # seq_mean: sequence means 1.5, 4, 0 (empty) -> 5.5 / global_seqs = 5.5 / 4
    got = aggregate_loss(loss, mask, "seq_mean", global_tokens=99.0, global_seqs=4.0)
    torch.testing.assert_close(got, torch.tensor(5.5 / 4))
    with pytest.raises(ConfigError, match="token_mean, seq_mean"):
        aggregate_loss(loss, mask, "sum", 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="global_tokens"):
        aggregate_loss(loss, mask, "token_mean", 0.0, 1.0)


def test_engine_loss_scale() -> None:
    assert engine_loss_scale(2, 2) == 4.0
    assert engine_loss_scale(8, 1) == 8.0
    with pytest.raises(ValueError):
        engine_loss_scale(0, 1)


# ---------------------------------------------------------------- policy_loss


def test_policy_loss_by_hand() -> None:
    # rho = 1 everywhere (logp == old_logp) so pg_tok = -A:
    #   A = [[1, 1], [-2, 0]], mask [[1, 1], [1, 0]]  -> pg_tok on mask: -1, -1, +2
    # ref - logp = [[ln 2, 0], [0, (masked)]] -> k3 = [[0.306853, 0], [0, -]]
    # token_mean (3 tokens): pg = 0/3 = 0; kl = 0.306853/3 = 0.102284; loss = 0.1 * 0.102284
    logp = torch.tensor([[0.0, 0.0], [0.0, 1000.0]], requires_grad=True)  # garbage at pad
    old = torch.tensor([[0.0, 0.0], [0.0, -1000.0]])
    ref = torch.tensor([[math.log(2), 0.0], [0.0, 5.0]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    k3 = 1 - math.log(2)
    loss, stats = policy_loss(
        logp, old, ref, adv, mask, clip_low=0.2, clip_high=0.2, kl_coef=0.1,
        mode="token_mean", global_tokens=3.0, global_seqs=2.0,
    )  # fmt: skip
    torch.testing.assert_close(loss, torch.tensor(0.1 * k3 / 3))
    torch.testing.assert_close(stats["pg_loss"], torch.tensor(0.0))
    torch.testing.assert_close(stats["kl_loss"], torch.tensor(k3 / 3))
    torch.testing.assert_close(stats["kl"], torch.tensor(k3 / 3))
    torch.testing.assert_close(stats["ratio"], torch.tensor(1.0))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(0.0))
    loss.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert logp.grad[1, 1].item() == 0.0
    # seq_mean: pg = (mean(-1, -1) + mean(2)) / 2 = 0.5; kl = (k3/2 + 0) / 2
    loss, stats = policy_loss(
        logp, old, ref, adv, mask, clip_low=0.2, clip_high=0.2, kl_coef=0.1,
        mode="seq_mean", global_tokens=3.0, global_seqs=2.0,
    )  # fmt: skip
    torch.testing.assert_close(loss, torch.tensor(0.5 + 0.1 * k3 / 4))
    torch.testing.assert_close(stats["kl"], torch.tensor(k3 / 3))  # stats stay token means


def test_policy_loss_needs_ref_for_kl() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(
            x, x, None, x, torch.ones(1, 2), clip_low=0.2, clip_high=0.2, kl_coef=0.1,
            mode="token_mean", global_tokens=2.0, global_seqs=1.0,
        )  # fmt: skip
    loss, stats = policy_loss(
        x, x, None, x, torch.ones(1, 2), clip_low=0.2, clip_high=0.2, kl_coef=0.0,
        mode="token_mean", global_tokens=2.0, global_seqs=1.0,
    )  # fmt: skip
    assert loss.item() == 0.0 and stats["kl"].item() == 0.0


# ---------------------------------------------------------------- split invariance

B, T, D, V = 8, 6, 5, 7
WORLD, GAS = 2, 2
LENGTHS = [6, 1, 3, 5, 2, 6, 4, 3]  # response lengths differ, so naive means are biased
# micro-batches (sequence indices) per rank; the uneven split has micro-batches of 1 and 3
EVEN = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
UNEVEN = [[[0], [1, 2, 3]], [[4, 5], [6, 7]]]


class Batch:
    """A fixed global batch: features, token ids, mask, old/ref log-probs and advantages."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        torch.manual_seed(1234)
        self.model = nn.Linear(D, V).double()
        self.x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        self.ids = torch.randint(0, V, (B, T), generator=g)
        self.mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # [B, T]
        with torch.no_grad():
            logp0 = self.logp(list(range(B)))
        # old/ref policies differ from the current one, so some tokens get clipped
        self.old = logp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
        self.ref = logp0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
        rewards = torch.rand(B, generator=g, dtype=torch.float64)
        seq_adv = grpo(group_rewards(rewards, 4)).reshape(B)  # [P, K] -> [B]
        self.adv = token_advantages(seq_adv, self.mask)  # [B, T]

    def logp(self, idx: list[int]) -> Tensor:
        return token_logprobs(self.model(self.x[idx]), self.ids[idx])  # [b, T]

    def loss(
        self, idx: list[int], mode: AggregationMode, tokens: float, seqs: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return policy_loss(
            self.logp(idx), self.old[idx], self.ref[idx], self.adv[idx], self.mask[idx],
            clip_low=0.2, clip_high=0.28, kl_coef=0.05, mode=mode,
            global_tokens=tokens, global_seqs=seqs,
        )  # fmt: skip

    def grads(self) -> list[Tensor]:
        grads = [p.grad.clone() for p in self.model.parameters() if p.grad is not None]
        self.model.zero_grad(set_to_none=True)
        return grads


def unsplit(batch: Batch, mode: AggregationMode) -> tuple[Tensor, list[Tensor], dict]:
    """Loss, gradient and stats of the global-batch mean, in one piece."""
    tokens = float(batch.mask.sum())
    loss, stats = batch.loss(list(range(B)), mode, tokens, float(B))
    loss.backward()
    return loss.detach(), batch.grads(), stats


def deepspeed_like(
    batch: Batch, mode: AggregationMode, split: list[list[list[int]]], naive: bool
) -> tuple[Tensor, list[Tensor], dict]:
    """Emulate DeepSpeed: per rank, backward(loss_mb / GAS) accumulates; ranks average.

    Sum form: loss_mb = aggregate over global counts * engine_loss_scale(WORLD, GAS).
    Naive: loss_mb = the micro-batch's own mean (its own token / sequence counts), scale 1.
    Returns the loss DeepSpeed would report (rank-mean of the GAS-scaled sums), the averaged
    gradient, and the SUM of the stats over all micro-batches.
    """
    tokens, seqs = float(batch.mask.sum()), float(B)
    scale = 1.0 if naive else engine_loss_scale(WORLD, GAS)
    rank_grads, rank_losses = [], []
    stats_sum: dict[str, Tensor] = {}
    for micro_batches in split:  # one rank
        assert len(micro_batches) == GAS
        rank_loss = torch.zeros((), dtype=torch.float64)
        for idx in micro_batches:
            if naive:
                tokens, seqs = float(batch.mask[idx].sum()), float(len(idx))
            loss, stats = batch.loss(idx, mode, tokens, seqs)
            loss = loss * scale
            (loss / GAS).backward()  # what engine.backward does with scale_wrt_gas=True
            rank_loss += loss.detach() / GAS
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, torch.zeros_like(v)) + v
        rank_grads.append(batch.grads())
        rank_losses.append(rank_loss)
    avg_grads = [torch.stack(gs).mean(0) for gs in zip(*rank_grads, strict=True)]  # all-reduce
    return torch.stack(rank_losses).mean(), avg_grads, stats_sum


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("split", [EVEN, UNEVEN], ids=["even", "uneven"])
def test_split_invariance(mode: AggregationMode, split: list[list[list[int]]]) -> None:
    batch = Batch()
    loss, grads, stats = unsplit(batch, mode)
    assert stats["clip_frac"].item() > 0  # the clip branch is exercised
    split_loss, split_grads, split_stats = deepspeed_like(batch, mode, split, naive=False)
    torch.testing.assert_close(split_loss, loss)
    for g_split, g in zip(split_grads, grads, strict=True):
        torch.testing.assert_close(g_split, g)
    for k, v in stats.items():
        torch.testing.assert_close(split_stats[k], v, msg=f"stat {k}")


@pytest.mark.parametrize(
    ("mode", "split"),
    [("token_mean", EVEN), ("token_mean", UNEVEN), ("seq_mean", UNEVEN)],
)
def test_naive_micro_batch_mean_is_not_invariant(
    mode: AggregationMode, split: list[list[list[int]]]
) -> None:
    # (seq_mean with equal-size micro-batches is a mean of equal-size means, hence exact;
    # with unequal ones it is not.)
    batch = Batch()
    loss, grads, _ = unsplit(batch, mode)
    naive_loss, naive_grads, _ = deepspeed_like(batch, mode, split, naive=True)
    assert not torch.allclose(naive_loss, loss)
    assert not all(torch.allclose(a, b) for a, b in zip(naive_grads, grads, strict=True))


# ---------------------------------------------------------------- purity


def test_maths_modules_import_without_heavy_deps() -> None:
    code = (
        "import sys, rl.algos.losses, rl.algos.advantages\n"
        "bad = [m for m in ('transformers', 'deepspeed', 'vllm', 'trl') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
