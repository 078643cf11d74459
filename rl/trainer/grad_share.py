"""Measured gradient share of step credit (`logging.credit_grad_share: true`).

`diag/step_credit_share` (rl.trainer.diagnostics) compares advantage norms, a proxy. This
measures the gradients themselves. At the update's start the policy-gradient loss is linear
in the advantage (ratio 1: the gradient of `-A * ratio` is `-A * grad log p`), so with
`A = A_out + A_step`, where `A_out` is the outcome estimator's advantage alone, the step's
gradient splits exactly into `g = g_out + g_step`. Over the whole step's batch and all ranks
it logs:

- `diag/step_credit_grad_share`: `|g_step|^2 / (|g_out|^2 + |g_step|^2)`;
- `diag/step_outcome_grad_cos`: the cosine between `g_step` and `g_out` (1: step credit only
  scales the outcome gradient; 0: it points elsewhere; -1: it fights it).

Both are scale-free, so the loss normalisation does not matter. The KL and entropy terms
are left out: this is about the advantages. Cost: one more forward and two backward passes
per micro-batch, and two all-reduces of a full-size gradient, so it is a diagnostic, off by
default. Needs the full parameters on every rank (ZeRO stage 0-2). The gradients are taken
with `torch.autograd.grad`, which does not accumulate into `.grad`, so the update is
unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rl.core.batching import micro_batches
from rl.core.types import RolloutBatch
from rl.engine import deepspeed_engine as eng
from rl.engine.forward import response_logprobs


def trainable_parameters(model: Any) -> list[Tensor]:
    """The parameters a gradient is taken for (of the engine's module, if an engine)."""
    module = getattr(model, "module", model)
    return [p for p in module.parameters() if p.requires_grad]


def flat_gradient(loss: Tensor, params: list[Tensor], retain_graph: bool) -> Tensor:
    """d loss / d params as one float32 vector [sum of numel] (zeros where unused)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def split_policy_gradients(
    model: Any,
    batch: RolloutBatch,
    outcome_advantages: Tensor,
    step_advantages: Tensor,
    temperature: float,
    micro_batch_size: int,
) -> tuple[Tensor, Tensor]:
    """(g_out, g_step), the gradients of `-sum(A * log p)` over response tokens with
    A = `outcome_advantages` and A = `step_advantages` (both [B, Tr]), summed over the
    batch's micro-batches on this rank: two float32 vectors of the parameters' size."""
    params = trainable_parameters(model)
    total_out = total_step = None
    for rows in micro_batches(len(batch), micro_batch_size):
        micro = batch.select(torch.tensor(rows))
        logp = response_logprobs(model, micro, temperature)  # [b, Tr], with gradient
        mask = micro.response_mask.to(logp.dtype)
        index = torch.tensor(rows, device=outcome_advantages.device)
        loss_out = -(outcome_advantages[index].to(logp) * logp * mask).sum()
        loss_step = -(step_advantages[index].to(logp) * logp * mask).sum()
        g_out = flat_gradient(loss_out, params, retain_graph=True)
        g_step = flat_gradient(loss_step, params, retain_graph=False)
        total_out = g_out if total_out is None else total_out + g_out
        total_step = g_step if total_step is None else total_step + g_step
    if total_out is None or total_step is None:  # a rank without rows
        size = sum(p.numel() for p in params)
        device = params[0].device
        zeros = torch.zeros(size, dtype=torch.float32, device=device)
        return zeros, zeros.clone()
    return total_out, total_step


def grad_share_row(g_out: Tensor, g_step: Tensor) -> dict[str, float]:
    """The `diag/step_credit_grad_share` and `diag/step_outcome_grad_cos` metrics of two
    gradient vectors (NaN where a norm is 0, as for the other ratios)."""
    sq_out = float((g_out.double() ** 2).sum())
    sq_step = float((g_step.double() ** 2).sum())
    dot = float((g_out.double() * g_step.double()).sum())
    total = sq_out + sq_step
    norms = math.sqrt(sq_out * sq_step)
    return {
        "diag/step_credit_grad_share": sq_step / total if total > 0 else float("nan"),
        "diag/step_outcome_grad_cos": dot / norms if norms > 0 else float("nan"),
    }


def measured_grad_share(
    model: Any,
    batch: RolloutBatch,
    outcome_advantages: Tensor,
    advantages: Tensor,
    temperature: float,
    micro_batch_size: int,
) -> dict[str, float]:
    """The step's measured gradient share over all ranks (every rank calls this):
    advantages and outcome_advantages [B, Tr], the step's total and its outcome part."""
    g_out, g_step = split_policy_gradients(
        model,
        batch,
        outcome_advantages,
        advantages - outcome_advantages,
        temperature,
        micro_batch_size,
    )
    return grad_share_row(eng.all_reduce_sum(g_out), eng.all_reduce_sum(g_step))
