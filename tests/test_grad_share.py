"""The measured gradient share of step credit (`rl.trainer.grad_share`) on a tiny model:
cases whose share and cosine follow by hand from the linearity of the policy gradient."""

from __future__ import annotations

import math

import pytest
import torch

from rl.config import load_config
from rl.core.errors import ConfigError
from rl.core.types import RolloutBatch
from rl.engine.forward import response_logprobs
from rl.trainer.grad_share import (
    flat_gradient,
    grad_share_row,
    measured_grad_share,
    split_policy_gradients,
    trainable_parameters,
)
from tests.models import tiny_llama

VOCAB = 16


def _batch() -> RolloutBatch:
    # 4 responses of up to 3 tokens after a 2-token prompt; the last one is 1 token long
    torch.manual_seed(1)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    return RolloutBatch(
        input_ids=torch.randint(1, VOCAB, (4, 5)),
        attention_mask=torch.cat([torch.ones(4, 2), mask], dim=1).long(),
        response_mask=mask,
        prompt_length=2,
        prompts=["a", "a", "b", "b"],
        completions=["x", "y", "z", "w"],
        group_size=2,
    )


OUTCOME_ADV = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1).expand(4, 3).clone()
STEP_ADV = torch.tensor([[0.0, -1.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]])


def test_row_of_hand_made_vectors() -> None:
    row = grad_share_row(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]))
    assert row["diag/step_credit_grad_share"] == pytest.approx(16 / 25)
    assert row["diag/step_outcome_grad_cos"] == 0.0
    row = grad_share_row(torch.tensor([1.0, 1.0]), torch.tensor([-2.0, -2.0]))
    assert row["diag/step_credit_grad_share"] == pytest.approx(8 / 10)
    assert row["diag/step_outcome_grad_cos"] == pytest.approx(-1.0)
    row = grad_share_row(torch.tensor([1.0, 1.0]), torch.zeros(2))
    assert row["diag/step_credit_grad_share"] == 0.0
    assert math.isnan(row["diag/step_outcome_grad_cos"])


def test_the_parts_add_up_to_the_full_policy_gradient() -> None:
    model, batch = tiny_llama(VOCAB), _batch()
    g_out, g_step = split_policy_gradients(model, batch, OUTCOME_ADV, STEP_ADV, 1.0, 3)
    logp = response_logprobs(model, batch)
    full = -((OUTCOME_ADV + STEP_ADV) * logp * batch.response_mask).sum()
    want = flat_gradient(full, trainable_parameters(model), retain_graph=False)
    torch.testing.assert_close(g_out + g_step, want, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated


def test_micro_batch_size_does_not_change_the_gradients() -> None:
    model, batch = tiny_llama(VOCAB), _batch()
    whole = split_policy_gradients(model, batch, OUTCOME_ADV, STEP_ADV, 1.0, 4)
    split = split_policy_gradients(model, batch, OUTCOME_ADV, STEP_ADV, 1.0, 1)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("step_scale", "share", "cos"),
    [(0.0, 0.0, None), (1.0, 0.5, 1.0), (-1.0, 0.5, -1.0), (2.0, 0.8, 1.0)],
)
def test_step_credit_proportional_to_the_outcome_advantage(
    step_scale: float, share: float, cos: float | None
) -> None:
    # A_step = c * A_out gives g_step = c * g_out: share c^2 / (1 + c^2), cosine sign(c)
    model, batch = tiny_llama(VOCAB), _batch()
    total = OUTCOME_ADV * (1.0 + step_scale)
    row = measured_grad_share(model, batch, OUTCOME_ADV, total, 1.0, 2)
    assert row["diag/step_credit_grad_share"] == pytest.approx(share, abs=1e-5)
    if cos is None:
        assert math.isnan(row["diag/step_outcome_grad_cos"])
    else:
        assert row["diag/step_outcome_grad_cos"] == pytest.approx(cos, abs=1e-5)


def test_padding_tokens_do_not_count() -> None:
    model, batch = tiny_llama(VOCAB), _batch()
    off_response = (1.0 - batch.response_mask) * 5.0  # advantages only where mask is 0
    g_out, g_step = split_policy_gradients(model, batch, OUTCOME_ADV, off_response, 1.0, 4)
    assert float(g_step.abs().max()) == 0.0
    assert float(g_out.abs().max()) > 0.0


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="credit_grad_share: needs logging.credit_diagnostics"):
        load_config("configs/quickstart.yaml", ["logging.credit_grad_share=true"])
    with pytest.raises(ConfigError, match="credit_grad_share: needs the full parameters"):
        load_config(
            "configs/quickstart.yaml",
            [
                "logging.credit_diagnostics=true",
                "logging.credit_grad_share=true",
                "deepspeed.zero_stage=3",
            ],
        )
