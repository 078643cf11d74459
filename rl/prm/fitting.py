"""The pieces a PRM is trained with (rl/prm/train.py's pipeline, rl/prm/active.py's selection):
solutions rendered under a `PRMConvention`, the BCE at the tags, step AUC and ProcessBench
first-error F1, one training pass and one scoring pass over rows shared by every rank, the
kept epoch, and the two engines the loop runs on (a DeepSpeed engine in the launcher, a plain
torch optimizer, `TorchEngine`, for library calls on one process)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rl.algos.first_error import first_error_from_step_values, processbench_scores
from rl.config import Config, PRMConfig
from rl.core.batching import plan_micro_batches
from rl.core.errors import DataError
from rl.data.prompts import seeded, val_prompt_set
from rl.engine import deepspeed_engine as eng
from rl.prm.convention import PRMConvention, TokenIds, render_ids, token_ids
from rl.prm.model import PRMModel, collate_solutions, gather_steps

F1_THRESHOLD = 0.5
"""A step whose P(good) is below this is predicted to be the first error."""


class StepExampleLike(Protocol):
    """What the trainer reads of a `rl.prm.data.StepExample`."""

    prompt: str
    completions: list[str]
    labels: list[bool]


# ----------------------------------------------------------------------------------------------
# Rendered data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRow:
    """One solution rendered for the PRM, with its labels when they have been bought."""

    ids: list[int]
    """Token ids [T]: prompt, then every step followed by the tag."""
    positions: list[int]
    """The tag positions [H], one per step."""
    labels: tuple[bool, ...] | None = None
    """Binary step labels [H] (None: not labelled)."""
    targets: tuple[float, ...] | None = None
    """Training targets [H] in [0, 1] (the labels, or soft `label_values`)."""


def example_targets(example: Any, soft: bool) -> tuple[float, ...]:
    """The training targets of one example: `label_values` when `soft` and present, else the
    binary labels as 0/1. DataError when `label_values` has another length or leaves [0, 1]."""
    values = getattr(example, "label_values", None) if soft else None
    if values is None:
        return tuple(1.0 if y else 0.0 for y in example.labels)
    if len(values) != len(example.labels) or not all(0.0 <= float(v) <= 1.0 for v in values):
        raise DataError(
            f"label_values {list(values)!r}: need {len(example.labels)} values in [0, 1]"
        )
    return tuple(float(v) for v in values)


def render_examples(
    examples: Sequence[Any],
    conv: PRMConvention,
    tokenizer: Any,
    tag_id: int,
    *,
    with_labels: bool = True,
    soft: bool = False,
) -> list[StepRow]:
    """Every example rendered (`render_ids`); labels and targets attached when `with_labels`."""
    rows = []
    for ex in examples:
        ids, positions = render_ids(conv, tokenizer, tag_id, ex.prompt, ex.completions)
        row = StepRow(ids, positions)
        if with_labels:
            row = replace(row, labels=tuple(bool(y) for y in ex.labels))
            row = replace(row, targets=example_targets(ex, soft))
        rows.append(row)
    return rows


def val_prompts(prompts: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """The held-out prompt texts: PAV's rule (`rl.data.prompts.val_prompt_set`) on the
    distinct `prompts`."""
    return val_prompt_set(prompts, val_fraction, seed)


def split_examples(
    examples: Sequence[Any], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train indices, val indices) of `examples`, split by prompt (`val_prompts`)."""
    held = val_prompts([ex.prompt for ex in examples], val_fraction, seed)
    train = [i for i, ex in enumerate(examples) if ex.prompt not in held]
    val = [i for i, ex in enumerate(examples) if ex.prompt in held]
    return train, val


def collate_targets(rows: Sequence[StepRow], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask [N, T]; positions [N, H] (-1 padding);
    targets [N, H] (0 at padding); step_mask [N, H] (1 at a labelled step)."""
    input_ids, mask, positions = collate_solutions([(r.ids, r.positions) for r in rows], pad_id)
    targets = torch.zeros(positions.shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r.targets is not None:
            targets[i, : len(r.targets)] = torch.tensor(r.targets, dtype=torch.float32)
    step_mask = (positions >= 0).float()
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "positions": positions,
        "targets": targets,
        "step_mask": step_mask,
    }


def tag_bce(z: Tensor, targets: Tensor, step_mask: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Sum-form BCE on log-odds at the tags.

    z: [b, H] log-odds at each tag; targets, step_mask: [b, H]; weight: [b] 0/1 (padding
    rows 0) -> (differentiable sum of BCE over counted steps, number of counted steps)."""
    mask = step_mask * weight.unsqueeze(1)  # [b, H]
    bce = F.binary_cross_entropy_with_logits(z, targets, reduction="none")  # [b, H]
    return (bce * mask).sum(), mask.sum()


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def step_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC of `scores` ranking good steps (label True) above bad ones: the probability
    that a random good step scores above a random bad one, ties counting one half (the
    Mann-Whitney statistic from average ranks). None when either class is absent."""
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average rank (1-based) within each run of ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    pos_rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def first_bad(labels: Sequence[bool]) -> int:
    """Index of the first step labelled bad, or -1 (ProcessBench's label)."""
    return next((h for h, y in enumerate(labels) if not y), -1)


def prm_scores(
    probs: Sequence[Sequence[float]],
    labels: Sequence[Sequence[bool]],
    threshold: float = F1_THRESHOLD,
) -> dict[str, Any]:
    """Step AUC and ProcessBench scores of per-step P(good) `probs` [N][H_i] against binary
    `labels` [N][H_i]: {"auc", "f1", "acc_error", "acc_correct", "bce"}."""
    flat_p = [p for row in probs for p in row]
    flat_y = [y for row in labels for y in row]
    predicted = [first_error_from_step_values(row, threshold) for row in probs]
    pb = processbench_scores(predicted, [first_bad(row) for row in labels])
    eps = 1e-7
    bce = -sum(
        math.log(min(max(p, eps), 1 - eps)) if y else math.log(min(max(1 - p, eps), 1 - eps))
        for p, y in zip(flat_p, flat_y, strict=True)
    ) / max(1, len(flat_p))
    return {
        "auc": step_auc(flat_p, flat_y),
        "f1": pb["f1"],
        "acc_error": pb["acc_error"],
        "acc_correct": pb["acc_correct"],
        "bce": bce,
    }


# ----------------------------------------------------------------------------------------------
# Engines: DeepSpeed in the launcher, plain torch for library calls
# ----------------------------------------------------------------------------------------------


class TorchEngine:
    """The few DeepSpeed-engine methods the loop uses, on one process: AdamW and clipping."""

    def __init__(
        self,
        module: nn.Module,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
    ) -> None:
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.device = next(module.parameters()).device

    def __call__(self, **inputs: Tensor) -> Tensor:
        out: Tensor = self.module(**inputs)
        return out

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


EngineFactory = Callable[[nn.Module, float], Any]
"""(module, learning rate) -> an engine (`TorchEngine` or a DeepSpeed engine)."""


def torch_engine_factory(
    betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, max_grad_norm: float = 1.0
) -> EngineFactory:
    def make(module: nn.Module, lr: float) -> Any:
        return TorchEngine(module, lr, betas, weight_decay, max_grad_norm)

    return make


def deepspeed_engine_factory(
    cfg: Config, dist: eng.DistInfo, micro_batch_size: int
) -> EngineFactory:
    """DeepSpeed engines with the run's `deepspeed` settings, ZeRO stage, clipping, dtype and
    AdamW betas; `micro_batch_size` per rank, one micro-batch per optimizer step."""

    def make(module: nn.Module, lr: float) -> Any:
        ds_config = eng.build_ds_config(
            cfg.deepspeed.config,
            zero_stage=cfg.deepspeed.zero_stage,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=1,
            world_size=dist.world_size,
            max_grad_norm=cfg.optim.max_grad_norm,
            bf16=eng.use_bf16(cfg.model.dtype),
        )
        return eng.create_policy_engine(
            module,
            ds_config,
            lr=lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            warmup_steps=0,
        )

    return make


def full_state(engine: Any) -> dict[str, Tensor] | None:
    """The engine's full weights as a CPU copy on rank 0 (None elsewhere); collective for a
    DeepSpeed engine (gathered under ZeRO-3)."""
    if isinstance(engine, TorchEngine):
        state: dict[str, Tensor] | None = engine.module.state_dict()
    else:
        state = eng.full_state_dict(engine)
    if state is None:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def loss_scale(engine: Any, world_size: int) -> float:
    """Cancels DeepSpeed's averaging of gradients over ranks (sum-form losses; see
    `rl.algos.losses.engine_loss_scale`); 1 for a `TorchEngine`."""
    return 1.0 if isinstance(engine, TorchEngine) else float(world_size)


# ----------------------------------------------------------------------------------------------
# Training and scoring passes
# ----------------------------------------------------------------------------------------------


def _forward_steps(engine: Any, batch: dict[str, Tensor]) -> Tensor:
    """The engine's log-odds at the tags: [b, H] (0 at padding); for an ensemble [b, H, K]."""
    device = engine.device
    z = engine(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )  # [b, T] (or [b, T, K])
    positions = batch["positions"].to(device)  # [b, H]
    if z.dim() == 2:
        return gather_steps(z, positions)  # [b, H]
    index = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, z.shape[-1])  # [b, H, K]
    return z.gather(1, index) * (positions >= 0).unsqueeze(-1)  # [b, H, K]


LossFn = Callable[[Tensor, dict[str, Tensor], Tensor, list[int]], tuple[Tensor, Tensor]]
"""(log-odds at tags, batch, row weights [b], row indices [b]) -> (loss sum, terms counted)."""


def default_loss(
    z: Tensor, batch: dict[str, Tensor], weight: Tensor, index: list[int]
) -> tuple[Tensor, Tensor]:
    del index
    return tag_bce(
        z, batch["targets"].to(z.device), batch["step_mask"].to(z.device), weight.to(z.device)
    )


def train_epoch(
    engine: Any,
    rows: Sequence[StepRow],
    order: list[int],
    dist: eng.DistInfo,
    micro_batch_size: int,
    pad_id: int,
    bar: Any = None,
    loss_fn: LossFn = default_loss,
) -> float:
    """One pass over `rows` in `order`; each micro-batch (the same count on every rank) is one
    optimizer step on the mean loss over the global micro-batch's tags. Returns the epoch's
    mean training loss over all ranks' tags."""
    engine.train()
    total = torch.zeros(2, dtype=torch.float64)  # (loss sum, terms) on this rank
    for index, real in plan_micro_batches(order, dist.world_size, dist.rank, micro_batch_size):
        batch = collate_targets([rows[i] for i in index], pad_id)
        weight = torch.tensor(real, dtype=torch.float32)
        loss_sum, count = loss_fn(_forward_steps(engine, batch), batch, weight, index)
        global_count = float(eng.all_reduce_sum(count.detach().double().reshape(1).cpu())[0])
        engine.backward(loss_sum / max(global_count, 1.0) * loss_scale(engine, dist.world_size))
        engine.step()
        total += torch.tensor([float(loss_sum.detach()), float(count)], dtype=torch.float64)
        if bar is not None:
            bar.update(1)
    total = eng.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1.0))


@torch.no_grad()
def predict_steps(
    engine: Any,
    rows: Sequence[StepRow],
    dist: eng.DistInfo,
    batch_size: int,
    pad_id: int,
) -> Tensor:
    """Log-odds at every tag of every row, on every rank: [N, H_max] (or [N, H_max, K] for an
    ensemble), 0 at padding. Each rank scores its share; the shares are summed over ranks."""
    engine.eval()
    h_max = max((len(r.positions) for r in rows), default=1) or 1
    out: Tensor | None = None
    for index, real in plan_micro_batches(
        list(range(len(rows))), dist.world_size, dist.rank, batch_size
    ):
        z = _forward_steps(engine, collate_targets([rows[i] for i in index], pad_id)).float().cpu()
        if out is None:
            out = torch.zeros((len(rows), h_max, *z.shape[2:]), dtype=torch.float64)
        for j, (i, keep) in enumerate(zip(index, real, strict=True)):
            if keep:
                out[i, : z.shape[1]] = z[j].double()
    engine.train()
    if out is None:
        out = torch.zeros((len(rows), h_max), dtype=torch.float64)
    return eng.all_reduce_sum(out)


def validate(
    engine: Any, rows: Sequence[StepRow], dist: eng.DistInfo, batch_size: int, pad_id: int
) -> dict[str, Any]:
    """Validation loss (BCE on the binary labels), step AUC and first-error F1 of `rows`."""
    z = predict_steps(engine, rows, dist, batch_size, pad_id)  # [N, H]
    probs = [torch.sigmoid(z[i, : len(r.positions)]).tolist() for i, r in enumerate(rows)]
    labels = [list(r.labels or ()) for r in rows]
    scores = prm_scores(probs, labels)
    return {
        "val_loss": scores["bce"],
        "val_auc": scores["auc"],
        "val_f1": scores["f1"],
        "val_acc_error": scores["acc_error"],
        "val_acc_correct": scores["acc_correct"],
    }


# ----------------------------------------------------------------------------------------------
# Building the PRM
# ----------------------------------------------------------------------------------------------


def convention_of(prm: PRMConfig) -> PRMConvention:
    """The convention the `prm` section asks for (ConfigError on a bad head or tag)."""
    return PRMConvention(
        step_tag=prm.step_tag,
        head=prm.head,
        good_token=prm.good_token,
        bad_token=prm.bad_token,
        prompt_format=prm.prompt_format,
        step_separator=prm.step_separator,
    )


def add_tag_token(tokenizer: Any, tag: str) -> bool:
    """Add `tag` to `tokenizer` as a special token unless it already reads it as one token;
    returns whether the vocabulary grew."""
    ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": [tag]})
    return True


def prepare_tokenizer(
    conv: PRMConvention, tokenizer: Any, add_tag: bool, model: str
) -> tuple[TokenIds, bool]:
    """The convention's token ids in `tokenizer` (after adding the tag when `add_tag`);
    ConfigError, one line, when a token is not one token. Returns (ids, vocabulary grew)."""
    grew = add_tag_token(tokenizer, conv.step_tag) if add_tag else False
    return token_ids(conv, tokenizer, model), grew


def build_prm(
    lm: Any, tokenizer: Any, conv: PRMConvention, ids: TokenIds, grew: bool, seed: int
) -> PRMModel:
    """The causal LM `lm` as a PRM: embeddings resized when the tokenizer `grew`; for
    `two_class`, a fresh 2-way head (small random init from `seed`) and, when the LM's
    output embeddings are not tied to its input ones, the unused LM head frozen."""
    if grew:
        lm.resize_token_embeddings(len(tokenizer))
    head = None
    if conv.head == "two_class":
        hidden = int(lm.config.hidden_size)
        head = nn.Linear(hidden, 2)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.02 * hidden**-0.5, generator=seeded(seed))
            head.bias.zero_()
        out_emb, in_emb = lm.get_output_embeddings(), lm.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            out_emb.requires_grad_(False)
    dtype = next(lm.parameters()).dtype
    return PRMModel(lm, conv, ids, head).to(dtype)


# ----------------------------------------------------------------------------------------------
# Fitting with validation and the kept epoch
# ----------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    engine: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    kept_epoch: int = 0
    kept_state: dict[str, Tensor] | None = None
    """Full weights of the kept epoch on rank 0 (None elsewhere)."""


KEEP_RULES = ("best", "best_f1", "last")
"""Which epoch `fit_prm` keeps: the lowest validation loss, the highest validation first-error
F1, or the last."""


def epoch_score(row: dict[str, Any], keep: str) -> float | None:
    """How good a validated epoch is under `keep` (higher is better); None unvalidated."""
    if "val_loss" not in row:
        return None
    if keep == "best_f1":
        return -1.0 if row.get("val_f1") is None else float(row["val_f1"])
    return -float(row["val_loss"])


def improves(row: dict[str, Any], best: float | None, keep: str = "best") -> bool:
    """Whether an epoch beats the `best` score so far (an epoch without validation, or the
    first validated one: yes; ties keep the earlier epoch)."""
    score = epoch_score(row, keep)
    return score is None or best is None or score > best


def fit_prm(
    engine: Any,
    train: Sequence[StepRow],
    val: Sequence[StepRow],
    dist: eng.DistInfo,
    *,
    epochs: int,
    micro_batch_size: int,
    eval_batch_size: int,
    pad_id: int,
    seed: int,
    keep: str = "best",
    validate_every: int = 1,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train `epochs` passes, validating after every `validate_every`-th and the last; keeps
    the weights of the validated epoch `keep` selects (`KEEP_RULES`). Collective: every
    rank calls it with the same rows."""
    steps = len(plan_micro_batches(list(range(len(train))), dist.world_size, 0, micro_batch_size))
    bar = None
    if progress and dist.is_main and epochs and steps:
        bar = tqdm(total=steps * epochs, desc="prm", unit="step")
    result, best = FitResult(engine), None
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=seeded(seed + epoch)).tolist()
        row: dict[str, Any] = {"epoch": epoch}
        row["train_loss"] = train_epoch(engine, train, order, dist, micro_batch_size, pad_id, bar)
        validated = bool(val) and (epoch % validate_every == 0 or epoch == epochs)
        if validated:
            row |= validate(engine, val, dist, eval_batch_size, pad_id)
        result.history.append(row)
        if log is not None and dist.is_main:
            log(f"prm epoch {epoch}/{epochs}: " + format_row(row))
        # every rank sees the same row (all-reduced), so they agree on when to gather
        if keep != "last" and validated and epoch < epochs and improves(row, best, keep):
            result.kept_epoch, best = epoch, epoch_score(row, keep)
            result.kept_state = full_state(engine)
    if bar is not None:
        bar.close()
    if (
        keep == "last"
        or result.kept_epoch == 0
        or (result.history and improves(result.history[-1], best, keep))
    ):
        result.kept_epoch, result.kept_state = epochs, full_state(engine)
    return result


def format_row(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in row.items()
        if k != "epoch"
    )


def kept_row(result: FitResult) -> dict[str, Any]:
    """The saved epoch's metrics ({} when no epoch ran)."""
    return result.history[result.kept_epoch - 1] if result.kept_epoch else {}
