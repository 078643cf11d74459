"""Fitting a value model on Monte-Carlo labels: micro-batch plans shared by every rank, the
BCE terms, one training pass, evaluation. Used by the verifier (rl/pav/train.py) and the
active-labelling ensemble (rl/pav/active.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from rl.algos.losses import engine_loss_scale
from rl.core.batching import plan_micro_batches
from rl.engine import deepspeed_engine as eng
from rl.pav.data import LabelBatch, SolutionRecord, collate


def soft_bce(prediction: float, label: float, eps: float = 1e-12) -> float:
    """Binary cross-entropy of a probability against a soft label in [0, 1]; the prediction is
    clipped to [eps, 1 - eps] so that a certain wrong prediction costs a finite amount."""
    p = min(max(prediction, eps), 1.0 - eps)
    return -(label * math.log(p) + (1.0 - label) * math.log(1.0 - p))


def bce_terms(logits: torch.Tensor, batch: LabelBatch, weight: torch.Tensor) -> dict[str, Any]:
    """Sum-form BCE pieces at labelled positions of rows with `weight` 1.

    logits: [b, T] verifier outputs, batch: labels/label_mask [b, T], weight: [b] 0/1 ->
    {"bce": scalar tensor (differentiable) = sum of BCE, "count": labelled positions,
    "correct": positions where `sigmoid(logit) > 0.5` agrees with `label > 0.5`}; count and
    correct are scalar tensors on the logits' device (no host read).
    """
    labels = batch.labels.to(logits.device)
    mask = batch.label_mask.to(logits.device) * weight.to(logits.device).unsqueeze(1)  # [b, T]
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [b, T]
    agree = ((logits.detach() > 0) == (labels > 0.5)).float()  # [b, T]
    return {
        "bce": (bce * mask).sum(),
        "count": mask.sum(),
        "correct": (agree * mask).sum(),
    }


TermsFn = Callable[[torch.Tensor, LabelBatch, torch.Tensor, list[int]], dict[str, Any]]
"""(logits, batch, row weights [b], record indices [b]) -> {"bce": sum, "count": terms}
(count: a scalar tensor, or a float)."""


def _scalar(value: Any, device: Any) -> torch.Tensor:
    """A term (scalar tensor or number) as a float64 scalar tensor on `device`."""
    return torch.as_tensor(value, dtype=torch.float64, device=device).detach()


def _forward(model: Any, batch: LabelBatch, device: Any) -> torch.Tensor:
    return model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    )  # [b, T]


def train_epoch(
    engine: Any,
    records: Sequence[SolutionRecord],
    order: list[int],
    dist: eng.DistInfo,
    micro_batch_size: int,
    pad_id: int,
    bar: Any = None,
    terms_fn: TermsFn | None = None,
) -> float:
    """One pass; each micro-batch is one optimizer step on the global mean BCE. Returns the
    mean training BCE over the epoch's labelled positions (all ranks). `terms_fn`: the loss
    pieces (default `bce_terms`; the selection ensemble of rl/pav/active.py has its own)."""
    engine.train()
    total = torch.zeros(2, dtype=torch.float64)  # (BCE sum, positions) on this rank
    # sums stay on the device: the only host read is the epoch's mean at the end
    for index, real in plan_micro_batches(order, dist.world_size, dist.rank, micro_batch_size):
        batch = collate([records[i] for i in index], pad_id)
        weight = torch.tensor(real, dtype=torch.float32)
        logits = _forward(engine, batch, engine.device)
        if terms_fn is None:
            terms = bce_terms(logits, batch, weight)
        else:
            terms = terms_fn(logits, batch, weight, index)
        bce, count = terms["bce"], _scalar(terms["count"], logits.device)
        global_count = eng.all_reduce_sum(count.reshape(1))[0].to(bce.dtype).clamp(min=1.0)
        # sum form over the global micro-batch, scaled to cancel DeepSpeed's rank averaging
        loss = bce / global_count * engine_loss_scale(dist.world_size, 1)
        engine.backward(loss)
        engine.step()
        total = total.to(logits.device) + torch.stack([_scalar(bce, logits.device), count])
        if bar is not None:
            bar.update(1)
    total = eng.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1.0))


@torch.no_grad()
def evaluate(
    engine: Any,
    records: Sequence[SolutionRecord],
    dist: eng.DistInfo,
    micro_batch_size: int,
    pad_id: int,
) -> dict[str, float]:
    """Mean BCE and accuracy over every labelled position of `records` (all ranks)."""
    engine.eval()
    total = torch.zeros(3, dtype=torch.float64)  # (BCE sum, correct, positions)
    order = list(range(len(records)))
    for index, real in plan_micro_batches(order, dist.world_size, dist.rank, micro_batch_size):
        batch = collate([records[i] for i in index], pad_id)
        weight = torch.tensor(real, dtype=torch.float32)
        logits = _forward(engine, batch, engine.device)
        terms = bce_terms(logits, batch, weight)
        parts = [_scalar(terms[k], logits.device) for k in ("bce", "correct", "count")]
        total = total.to(logits.device) + torch.stack(parts)
    engine.train()
    bce, correct, count = eng.all_reduce_sum(total).tolist()  # the one host read
    n = max(count, 1.0)
    return {"bce": bce / n, "acc": correct / n}


def value_ds_config(cfg: Any, dist: eng.DistInfo) -> dict[str, Any]:
    """The verifier's DeepSpeed config: `pav.micro_batch_size` per rank, one micro-batch
    per step, the run's `deepspeed` config, ZeRO stage, clipping and dtype."""
    return eng.build_ds_config(
        cfg.deepspeed.config,
        zero_stage=cfg.deepspeed.zero_stage,
        micro_batch_size=cfg.pav.micro_batch_size,
        grad_accum_steps=1,
        world_size=dist.world_size,
        max_grad_norm=cfg.optim.max_grad_norm,
        bf16=eng.use_bf16(cfg.model.dtype),
    )


def make_value_engine(
    cfg: Any, dist: eng.DistInfo, model: torch.nn.Module, ds_config: dict[str, Any] | None = None
) -> Any:
    """`model` as a DeepSpeed engine with the verifier's settings (`value_ds_config`, or
    `ds_config` when the model was loaded under it): AdamW at `pav.lr` (the run's betas and
    weight decay, no warm-up)."""
    return eng.create_policy_engine(
        model,
        ds_config if ds_config is not None else value_ds_config(cfg, dist),
        lr=cfg.pav.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=0,
    )
