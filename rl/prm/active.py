"""Active selection of step labels for a discriminative PRM (ActPRM, Duan et al. 2025), and the
budget curve's entry point `train_with_budget`.

A pool of solutions (prompt + steps) is available unlabelled; a teacher (a stronger model, a
judge, humans, Monte-Carlo estimation) would label every step of a solution it is asked
about. With a budget of `budget_frac` of the pool's solutions:

- `uniform`: that many solutions drawn in a seeded random order (the baseline);
- `uncertainty` (ActPRM's form with binary labels): the budget is bought in
  `select_rounds` rounds. The first round is drawn at random (no model has seen a label
  yet). After each round a selection ensemble (`rl.pav.active.EnsembleValueModel`:
  `ensemble_heads` binary heads on one backbone initialised from the policy, each head
  trained on a fixed random half of the labelled solutions, a bootstrap that keeps the heads
  apart) trains
  `selector_epochs` passes over the labels so far, scores every unlabelled solution of the
  pool, and the next round buys the most uncertain ones.

Uncertainty of a solution (reused from `rl.pav.active.uncertainty`): at each step, with p_k
the heads' P(good), aleatoric = 1 - 2|mean_k p_k - 0.5| and epistemic = 2 std_k p_k; the
solution's score is the largest of both over its steps (`max`), or of the epistemic term
alone (`epistemic`). ActPRM keeps a sample when any step is uncertain in either sense under
fixed thresholds; ranking by the largest term lets a fixed budget be spent instead.

Departures from ActPRM: the pool is scored in a few rounds rather than filtered batch by batch
while the PRM trains; the ensemble is a separate model used only to choose, and the PRM is then
trained from the policy on the bought labels exactly as with uniform selection, so the
selection rule changes which labels are bought, not how the PRM learns from them. Each head
is one log-odds output (a 2-class softmax head is over-parameterised: only the difference of
its two rows matters, so the two are the same family).

Labels are only read through `LabelOracle.label`, which counts what it reveals: the teacher
labels used are the steps of the bought solutions; the rest of the pool is counted as skipped.
The held-out validation solutions are always labelled and counted apart.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rl.config import PRMConfig
from rl.data.prompts import seeded
from rl.engine import deepspeed_engine as eng
from rl.pav.active import (
    EnsembleValueModel,
    bootstrap_mask,
    n_selected,
    rank_candidates,
    uncertainty,
)
from rl.prm.convention import PRMConvention, TokenIds
from rl.prm.data import until_first_error
from rl.prm.fitting import (
    EngineFactory,
    FitResult,
    StepRow,
    build_prm,
    example_targets,
    fit_prm,
    kept_row,
    predict_steps,
    render_examples,
    split_examples,
    torch_engine_factory,
    train_epoch,
)
from rl.prm.synthetic import synthetic_negatives

SELECTIONS = ("uncertainty", "uniform")


# ----------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------


class LabelOracle:
    """The pool's labels, revealed only for the solutions asked about, and counted."""

    def __init__(self, examples: Sequence[Any], soft: bool = False) -> None:
        self._examples = list(examples)
        self._soft = soft
        self.bought: list[int] = []
        """Pool indices labelled so far, in the order bought."""

    def __len__(self) -> int:
        return len(self._examples)

    def steps(self, i: int) -> int:
        """Steps of solution `i` (known without its labels)."""
        return len(self._examples[i].completions)

    def label(self, indices: Sequence[int], rows: Sequence[StepRow]) -> list[StepRow]:
        """`rows` (the rendered solutions `indices`) with their labels and targets; each
        index is bought once (asking again is free)."""
        out = []
        for i, row in zip(indices, rows, strict=True):
            if i not in self._bought_set():
                self.bought.append(i)
            ex = self._examples[i]
            out.append(
                replace(
                    row,
                    labels=tuple(bool(y) for y in ex.labels),
                    targets=example_targets(ex, self._soft),
                )
            )
        return out

    def _bought_set(self) -> set[int]:
        return set(self.bought)

    def teacher_labels(self) -> int:
        """Step labels bought so far."""
        return sum(self.steps(i) for i in self.bought)


# ----------------------------------------------------------------------------------------------
# Pure selection helpers
# ----------------------------------------------------------------------------------------------


def budget_size(n: int, budget_frac: float) -> int:
    """Solutions bought out of a pool of `n` at `budget_frac` in (0, 1]: ceil(frac * n), at
    least 1 of a non-empty pool."""
    return max(min(n, 1), n_selected(n, budget_frac))


def round_sizes(total: int, rounds: int) -> list[int]:
    """`total` split into at most `rounds` non-empty parts, the larger ones first."""
    rounds = max(1, min(rounds, total))
    base, extra = divmod(total, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)] if total else []


def uniform_choice(n: int, k: int, seed: int) -> list[int]:
    """`k` of `range(n)` in a seeded random order."""
    return rank_candidates(None, n, seed)[:k]


def most_uncertain(scores: Sequence[float], candidates: Sequence[int], k: int) -> list[int]:
    """The `k` `candidates` (pool indices) with the largest `scores` (aligned with
    `candidates`), ties broken by the lower pool index."""
    ranked = rank_candidates(list(scores), len(candidates), 0)
    return [candidates[j] for j in ranked[:k]]


# ----------------------------------------------------------------------------------------------
# The selection ensemble
# ----------------------------------------------------------------------------------------------


def ensemble_bce(
    z: Tensor, targets: Tensor, step_mask: Tensor, weight: Tensor, head_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Sum-form BCE of every head on the steps of its bootstrap rows.

    z: [b, H, K] log-odds at the tags; targets, step_mask: [b, H]; weight: [b] 0/1;
    head_mask: [b, K] 0/1 -> (differentiable sum, (step, head) pairs counted)."""
    mask = step_mask.unsqueeze(-1) * (weight.unsqueeze(1) * head_mask).unsqueeze(1)  # [b, H, K]
    bce = F.binary_cross_entropy_with_logits(
        z, targets.unsqueeze(-1).expand_as(z), reduction="none"
    )  # [b, H, K]
    return (bce * mask).sum(), mask.sum()


@dataclass
class Selector:
    """The selection ensemble as an engine, trained and read by every rank alike."""

    engine: Any
    dist: eng.DistInfo
    heads: int
    seed: int
    micro_batch_size: int
    eval_batch_size: int
    pad_id: int
    kind: str = "max"
    history: list[float] = field(default_factory=list)

    def train(
        self, rows: Sequence[StepRow], keys: Sequence[int], epochs: int, round_index: int
    ) -> None:
        """`epochs` passes over the labelled `rows` (pool indices `keys`); logs the last loss."""
        masks = bootstrap_mask([(k, 0) for k in keys], self.heads, self.seed)  # [N, K]

        def loss(z: Tensor, batch: dict[str, Tensor], weight: Tensor, index: list[int]) -> Any:
            dev = z.device
            return ensemble_bce(
                z,
                batch["targets"].to(dev),
                batch["step_mask"].to(dev),
                weight.to(dev),
                masks[index].to(dev),
            )

        value = float("nan")
        for epoch in range(epochs):
            order = torch.randperm(
                len(rows), generator=seeded(self.seed + 7919 * round_index + epoch)
            ).tolist()
            value = train_epoch(
                self.engine, rows, order, self.dist, self.micro_batch_size, self.pad_id, None, loss
            )
        self.history.append(value)

    def score(self, rows: Sequence[StepRow]) -> list[float]:
        """Uncertainty of every row (module docstring) -> [N], the same on every rank."""
        z = predict_steps(self.engine, rows, self.dist, self.eval_batch_size, self.pad_id)
        probs = torch.sigmoid(z).permute(2, 0, 1)  # [K, N, H]
        mask = torch.zeros(z.shape[:2], dtype=probs.dtype)  # [N, H]
        for i, r in enumerate(rows):
            mask[i, : len(r.positions)] = 1.0
        return uncertainty(probs, mask, self.kind).tolist()


def make_selector(
    lm: Any, prm: PRMConfig, seed: int, dist: eng.DistInfo, make_engine: EngineFactory, pad_id: int
) -> Selector:
    """A fresh ensemble on a copy of `lm`'s base model (the PRM trains its own copy)."""
    backbone = copy.deepcopy(lm.base_model)
    model = EnsembleValueModel(backbone, prm.ensemble_heads, seed).to(next(lm.parameters()).dtype)
    return Selector(
        make_engine(model, prm.lr),
        dist,
        prm.ensemble_heads,
        seed,
        prm.micro_batch_size,
        prm.eval_batch_size,
        pad_id,
        prm.uncertainty,
    )


# ----------------------------------------------------------------------------------------------
# Buying the budget
# ----------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What was bought from the pool."""

    chosen: list[int]
    """Pool indices labelled, in the order bought."""
    rows: list[StepRow]
    """Their rendered, labelled rows (aligned with `chosen`)."""
    selector_loss: list[float]
    rounds: int


def select_pool(
    pool: Sequence[StepRow],
    oracle: LabelOracle,
    k: int,
    selection: str,
    seed: int,
    rounds: int,
    selector: Callable[[], Selector] | None,
    selector_epochs: int,
) -> Selection:
    """Buy `k` labels of the unlabelled `pool` (rows without labels) by `selection`."""
    if selection == "uniform" or k >= len(pool) or selector is None:
        chosen = uniform_choice(len(pool), k, seed)
        return Selection(chosen, oracle.label(chosen, [pool[i] for i in chosen]), [], 1)
    sizes = round_sizes(k, rounds)
    chosen = uniform_choice(len(pool), sizes[0], seed)  # round 0: nothing learnt yet
    rows = oracle.label(chosen, [pool[i] for i in chosen])
    model = selector()
    for r, size in enumerate(sizes[1:], start=1):
        model.train(rows, chosen, selector_epochs, r)
        taken = set(chosen)
        rest = [i for i in range(len(pool)) if i not in taken]
        scores = model.score([pool[i] for i in rest])
        new = most_uncertain(scores, rest, size)
        chosen += new
        rows += oracle.label(new, [pool[i] for i in new])
    return Selection(chosen, rows, model.history, len(sizes))


@dataclass
class BudgetOutcome:
    fit: FitResult
    metrics: dict[str, Any]


def budget_run(
    pool_examples: Sequence[Any],
    val_examples: Sequence[Any],
    prm: PRMConfig,
    seed: int,
    *,
    lm: Any,
    tokenizer: Any,
    conv: PRMConvention,
    ids: TokenIds,
    grew: bool,
    dist: eng.DistInfo,
    make_engine: EngineFactory,
    make_selector_engine: EngineFactory | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> BudgetOutcome:
    """Buy `prm.budget_frac` of the pool's labels by `prm.selection`, train the PRM on them
    from `lm` (validated on `val_examples`, fully labelled), and count what was used.
    Collective: every rank calls it with the same data."""
    if prm.after_first_error == "drop":
        pool_examples = [until_first_error(e) for e in pool_examples]
        val_examples = [until_first_error(e) for e in val_examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if grew:  # once, so that the ensemble's copy and the PRM both read the new tag
        lm.resize_token_embeddings(len(tokenizer))
    pool = render_examples(pool_examples, conv, tokenizer, ids.tag, with_labels=False)
    val = render_examples(val_examples, conv, tokenizer, ids.tag, soft=False)
    oracle = LabelOracle(pool_examples, soft=prm.soft_labels)
    k = budget_size(len(pool), prm.budget_frac)
    factory = make_selector_engine or make_engine

    def selector() -> Selector:
        return make_selector(lm, prm, seed, dist, factory, pad_id)

    bought = select_pool(
        pool, oracle, k, prm.selection, seed, prm.select_rounds, selector, prm.selector_epochs
    )
    synthetic = synthetic_negatives(
        [pool_examples[i] for i in bought.chosen], prm.synthetic_negatives, seed
    )
    train_rows = bought.rows + render_examples(
        synthetic, conv, tokenizer, ids.tag, soft=prm.soft_labels
    )
    engine = make_engine(build_prm(lm, tokenizer, conv, ids, False, seed), prm.lr)
    fit = fit_prm(
        engine,
        train_rows,
        val,
        dist,
        epochs=prm.epochs,
        micro_batch_size=prm.micro_batch_size,
        eval_batch_size=prm.eval_batch_size,
        pad_id=pad_id,
        seed=seed,
        keep=prm.keep,
        validate_every=prm.validate_every,
        progress=progress,
        log=log,
    )
    metrics = budget_metrics(prm, pool, val, oracle, bought, fit, k)
    metrics["selection"]["synthetic_negatives"] = len(synthetic)
    return BudgetOutcome(fit, metrics)


def budget_metrics(
    prm: PRMConfig,
    pool: Sequence[StepRow],
    val: Sequence[StepRow],
    oracle: LabelOracle,
    bought: Selection,
    fit: FitResult,
    k: int,
) -> dict[str, Any]:
    """The record of one budget run: labels bought and skipped, every epoch, the kept one."""
    pool_steps = sum(len(r.positions) for r in pool)
    teacher = oracle.teacher_labels()
    selection = {
        "selection": prm.selection if k < len(pool) else "all",
        "budget_frac": prm.budget_frac,
        "pool_solutions": len(pool),
        "pool_steps": pool_steps,
        "labelled_solutions": len(oracle.bought),
        "teacher_labels": teacher,
        "skipped_solutions": len(pool) - len(oracle.bought),
        "skipped_steps": pool_steps - teacher,
        "rounds": bought.rounds,
        "selector_loss": bought.selector_loss,
    }
    best = kept_row(fit)
    return {
        "selection": selection,
        "val_solutions": len(val),
        "val_labels": sum(len(r.positions) for r in val),
        "epochs": fit.history,
        "kept_epoch": fit.kept_epoch,
        "f1": best.get("val_f1"),
        "auc": best.get("val_auc"),
        "val_loss": best.get("val_loss"),
    }


def train_with_budget(
    examples: Sequence[Any],
    budget_frac: float,
    selection: str,
    seed: int,
    *,
    model_path: str | Path,
    val_examples: Sequence[Any] | None = None,
    prm: PRMConfig | None = None,
    out_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Train a PRM from the causal LM at `model_path` on `budget_frac` of `examples`' labels
    chosen by `selection` (`uncertainty` or `uniform`), on this process (no DeepSpeed).

    `val_examples`: the held-out solutions F1 and AUC are measured on (default: split from
    `examples` by prompt at `prm.val_fraction`). `prm`: the other settings (convention,
    epochs, lr, ensemble; defaults of `PRMConfig`). `out_dir`: save the kept PRM there.
    Returns the metrics: `f1`, `auc`, `val_loss` of the kept epoch, `teacher_labels`,
    `labelled_solutions`, `budget_frac`, `selection`, `seed`, and the full record."""
    from rl.core.errors import ConfigError
    from rl.prm.fitting import convention_of
    from rl.prm.model import save_prm

    if selection not in SELECTIONS:
        raise ConfigError(f"selection {selection!r} is not one of {list(SELECTIONS)}")
    if not 0.0 < budget_frac <= 1.0:
        raise ConfigError(f"budget_frac: must be in (0, 1], got {budget_frac}")
    prm = replace(prm or PRMConfig(), budget_frac=budget_frac, selection=selection, seed=seed)  # type: ignore[arg-type]
    conv = convention_of(prm)
    lm, tokenizer, ids, grew = load_start(model_path, conv, prm.add_tag_token, seed, dtype)
    pool, val = pool_and_val(examples, val_examples, prm.val_fraction, seed)
    outcome = budget_run(
        pool,
        val,
        prm,
        seed,
        lm=lm,
        tokenizer=tokenizer,
        conv=conv,
        ids=ids,
        grew=grew,
        dist=eng.DistInfo(rank=0, world_size=1, local_rank=0),
        make_engine=torch_engine_factory(),
    )
    if out_dir is not None:
        save_prm(outcome.fit.engine.module, tokenizer, out_dir, state_dict=outcome.fit.kept_state)
    return budget_row(outcome, budget_frac, selection, seed)


def load_start(
    model_path: str | Path, conv: PRMConvention, add_tag: bool, seed: int, dtype: torch.dtype
) -> tuple[Any, Any, TokenIds, bool]:
    """(causal LM, tokenizer, the convention's token ids, whether the tag was added) from
    `model_path`; the convention is checked on the tokenizer before the weights load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.prm.fitting import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids, grew = prepare_tokenizer(conv, tokenizer, add_tag, str(model_path))
    random.seed(seed)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
    return lm, tokenizer, ids, grew


def pool_and_val(
    examples: Sequence[Any], val_examples: Sequence[Any] | None, val_fraction: float, seed: int
) -> tuple[list[Any], list[Any]]:
    """(pool, held-out): `val_examples` when given, else a split of `examples` by prompt."""
    if val_examples is None:
        train_idx, val_idx = split_examples(examples, val_fraction, seed)
        return [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    return list(examples), list(val_examples)


def budget_row(
    outcome: BudgetOutcome, budget_frac: float, selection: str, seed: int
) -> dict[str, Any]:
    """`train_with_budget`'s answer: the kept epoch's scores and the labels used."""
    sel = outcome.metrics["selection"]
    return {
        "f1": outcome.metrics["f1"],
        "auc": outcome.metrics["auc"],
        "val_loss": outcome.metrics["val_loss"],
        "teacher_labels": sel["teacher_labels"],
        "labelled_solutions": sel["labelled_solutions"],
        "skipped_solutions": sel["skipped_solutions"],
        "budget_frac": budget_frac,
        "selection": selection,
        "seed": seed,
        "record": outcome.metrics,
    }
