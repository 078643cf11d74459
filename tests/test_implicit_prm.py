"""Hand-computed checks for the implicit-PRM maths (token/step/sequence rewards, CE loss)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from rl.algos.credit import steps_to_tokens
from rl.algos.implicit_prm import (
    implicit_prm_ce_loss,
    implicit_step_rewards,
    implicit_token_rewards,
    sequence_reward,
)
from rl.core.errors import ConfigError


def test_token_rewards_by_hand() -> None:
    # beta * (prm - ref): 0.05 * (-1 + 1.5) = 0.025; 0.05 * (-2 + 1) = -0.05; 3rd off-mask -> 0
    prm = torch.tensor([[-1.0, -2.0, float("nan")]])
    ref = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    r = implicit_token_rewards(prm, ref, mask, beta=0.05)
    torch.testing.assert_close(r, torch.tensor([[0.025, -0.05, 0.0]]))
    # r_phi = 0.025 - 0.05 = -0.025
    torch.testing.assert_close(sequence_reward(r, mask), torch.tensor([-0.025]))


def test_token_rewards_gradient_flows_to_prm_only() -> None:
    prm = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    implicit_token_rewards(prm, ref, torch.ones(1, 2), beta=0.5).sum().backward()
    assert prm.grad is not None and ref.grad is None
    torch.testing.assert_close(prm.grad, torch.tensor([[0.5, 0.5]]))  # d(beta * prm)/d prm


def test_token_rewards_bad_input() -> None:
    with pytest.raises(ConfigError, match="beta"):
        implicit_token_rewards(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), beta=0.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        implicit_token_rewards(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


def test_step_rewards_by_hand() -> None:
    # row 0: steps {0: tokens 0-1, 1: tokens 2-3}, token 4 padding -> [1+2, 3+4] = [3, 7]
    # row 1: steps {0: token 0, 1: token 1, 2: token 2}          -> [5, 6, 7]
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 6.0, 7.0, 0.0, 0.0]])
    step_id = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 2, -1, -1]])
    steps, step_mask = implicit_step_rewards(r, step_id)
    torch.testing.assert_close(steps, torch.tensor([[3.0, 7.0, 0.0], [5.0, 6.0, 7.0]]))
    torch.testing.assert_close(step_mask, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    # placed on step ends: row 0 ends at tokens 1 and 3, row 1 at 0, 1, 2
    step_end = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(
        steps_to_tokens(steps, step_end),
        torch.tensor([[0.0, 3.0, 0.0, 7.0, 0.0], [5.0, 6.0, 7.0, 0.0, 0.0]]),
    )
    # the step sums add up to r_phi
    mask = (step_id >= 0).float()
    torch.testing.assert_close(steps.sum(dim=1), sequence_reward(r, mask))


def test_step_rewards_n_steps_and_empty() -> None:
    r = torch.tensor([[1.0, 2.0]])
    steps, step_mask = implicit_step_rewards(r, torch.tensor([[0, 0]]), n_steps=3)
    torch.testing.assert_close(steps, torch.tensor([[3.0, 0.0, 0.0]]))
    torch.testing.assert_close(step_mask, torch.tensor([[1.0, 0.0, 0.0]]))
    steps, step_mask = implicit_step_rewards(r, torch.tensor([[-1, -1]]))  # no step at all
    assert steps.shape == (1, 0) and step_mask.shape == (1, 0)
    with pytest.raises(ValueError, match="n_steps=1"):
        implicit_step_rewards(r, torch.tensor([[0, 1]]), n_steps=1)


def test_ce_loss_by_hand() -> None:
    r = torch.tensor([[0.025, -0.05]])  # r_phi = -0.025
    mask = torch.ones(1, 2)
    # r_o = 1: -log sigma(-0.025) = log(1 + e^0.025) = log(2.025315) = 0.705725
    loss, stats = implicit_prm_ce_loss(r, mask, torch.tensor([1.0]), global_seqs=1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.025)), abs=1e-6)
    assert loss.item() == pytest.approx(0.705725, abs=1e-6)
    assert stats["prm/acc"].item() == 0.0  # r_phi < 0 but the outcome is correct
    # r_o = 0: -log(1 - sigma(-0.025)) = log(1 + e^-0.025) = log(1.975310) = 0.680725
    loss, stats = implicit_prm_ce_loss(r, mask, torch.tensor([0.0]), global_seqs=1)
    assert loss.item() == pytest.approx(0.680725, abs=1e-6)
    assert stats["prm/acc"].item() == 1.0
    # both rows in one batch of global_seqs = 2: (0.705725 + 0.680725) / 2 = 0.693225
    loss, stats = implicit_prm_ce_loss(
        r.repeat(2, 1), torch.ones(2, 2), torch.tensor([1.0, 0.0]), global_seqs=2
    )
    assert loss.item() == pytest.approx(0.693225, abs=1e-6)
    assert stats["prm/ce_loss"].item() == pytest.approx(0.693225, abs=1e-6)
    assert stats["prm/acc"].item() == 0.5
    assert not stats["prm/ce_loss"].requires_grad


def test_ce_loss_stable_for_large_rewards() -> None:
    # r_phi = 200: r_o = 1 -> ~0; r_o = 0 -> log(1 + e^200) ~= 200 (naive log(1 - sigma) = -inf)
    r = torch.tensor([[200.0]], requires_grad=True)
    loss, _ = implicit_prm_ce_loss(r, torch.ones(1, 1), torch.tensor([0.0]), global_seqs=1)
    assert loss.item() == pytest.approx(200.0)
    loss.backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()


def test_ce_loss_split_invariance() -> None:
    g = torch.Generator().manual_seed(0)
    prm = torch.randn(6, 5, generator=g, dtype=torch.float64)
    ref = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    outcome = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5], dtype=torch.float64)

    def grad_and_loss(splits: list[slice]) -> tuple[float, torch.Tensor, float]:
        p = prm.clone().requires_grad_(True)
        total, acc = torch.zeros((), dtype=torch.float64), 0.0
        for s in splits:
            r = implicit_token_rewards(p[s], ref[s], mask[s], beta=0.5)
            loss, stats = implicit_prm_ce_loss(r, mask[s], outcome[s], global_seqs=6)
            loss.backward()
            total, acc = total + loss.detach(), acc + stats["prm/acc"].item()
        assert p.grad is not None
        return total.item(), p.grad, acc

    whole = grad_and_loss([slice(0, 6)])
    split = grad_and_loss([slice(0, 1), slice(1, 4), slice(4, 6)])
    assert whole[0] == pytest.approx(split[0], abs=1e-12)
    torch.testing.assert_close(whole[1], split[1])
    assert whole[2] == pytest.approx(split[2])


def test_ce_loss_bad_input() -> None:
    r, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="global_seqs"):
        implicit_prm_ce_loss(r, m, torch.zeros(2), global_seqs=0)
    with pytest.raises(ValueError, match=r"outcome \[B\] = \[2\]"):
        implicit_prm_ce_loss(r, m, torch.zeros(3), global_seqs=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        implicit_prm_ce_loss(r, m, torch.tensor([2.0, 0.0]), global_seqs=2)


class _TinyLM(torch.nn.Module):
    """Logits from an embedding of the current token (no host reads), behind the engine calls
    the implicit PRM's update makes."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, vocab)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=0.1)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


def _logprobs(model: _TinyLM, batch: Any) -> torch.Tensor:
    """Response tokens' log-probs `[b, Tr]` (what `response_logprobs` computes)."""
    tp = batch.prompt_length
    logits = model.embed(batch.input_ids[:, tp - 1 : -1])  # [b, Tr, V]
    return logits.log_softmax(-1).gather(-1, batch.input_ids[:, tp:, None]).squeeze(-1)


def _head_batch(rows: int) -> Any:
    from rl.core.types import HeadBatch

    ids = torch.randint(0, 11, (rows, 5), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones(rows, 3)
    return HeadBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=mask,
        prompt_length=2,
        prompts=[""] * rows,
        completions=[""] * rows,
        step_id=torch.zeros(rows, 3, dtype=torch.long),
        step_end=torch.tensor([[0.0, 0.0, 1.0]]).expand(rows, 3),
    )


def test_update_reads_the_host_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The online update keeps its loss and accuracy sums on the device: its host reads do
    not grow with the number of micro-batches (each would wait for the GPU)."""
    import rewards.implicit_prm_head as head_module
    from tests.host_reads import counted_host_reads

    monkeypatch.setattr(head_module, "response_logprobs", _logprobs)
    counts, stats = [], []
    for rows in (2, 8):  # 1 and 4 micro-batches of 2
        head = head_module.ImplicitPRMHead(beta=0.5)
        head.engine, head.reference = _TinyLM(), _TinyLM(vocab=11)
        head.micro_batch_size, head.grad_accum_steps = 2, rows // 2
        batch = _head_batch(rows)
        outcome = (torch.arange(rows) % 2).float()
        with counted_host_reads() as reads:
            stats.append(head.update(batch, outcome))
        counts.append(len(reads))
    assert counts[0] == counts[1], counts
    for row in stats:
        assert set(row) == {"ce_loss", "acc"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())
