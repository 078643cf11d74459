"""On-policy PRM refresh: teacher step labels on the policy's current responses, and a few
optimizer steps of the PRM on them, inside the RL loop (the `prm` head's `refresh_*` options).

Why: a PRM trained once on the start policy's solutions loses the errors of the policy that
RL makes of it (benchmarks/results/learned_prm: the share of first wrong steps it flags falls
from 96.5% on the start policy's solutions to 19.6% on a PRM-trained policy's). Every
`every` RL steps the head labels `rows` of each rank's scored responses with a labeler (a
teacher; `rl.prm.labelers`), gathers the labelled solutions of every rank and trains the PRM
`epochs` passes over them (`rl.prm.fitting.train_epoch`: the BCE at the tags). Every label
bought is counted (`RefreshState`), so a comparison can charge the method for them.

Two anchors against the refresh feeding itself (a policy whose solutions are mostly wrong
gives refresh batches of mostly "bad" labels; the PRM then learns "bad" rather than which step,
flags everything, and the policy gets worse): `replay` mixes solutions of the PRM's own
training data (labels already bought, not counted again) into every refresh, and `balance`
weighs each refresh's good and bad step labels equally in the BCE.

Before it learns from them, the fresh labels measure the PRM on the policy's current
solutions (first-error F1 and recall of the first wrong step, from the probabilities the head
already computed to score the step): a free, on-policy view of how far the PRM has drifted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rl.algos.first_error import first_error_from_step_values
from rl.core.errors import ConfigError
from rl.data.prompts import seeded
from rl.engine import deepspeed_engine as eng
from rl.prm.data import StepExample, until_first_error
from rl.prm.fitting import LossFn, first_bad, prm_scores, render_examples, tag_bce, train_epoch
from rl.prm.labelers import ROLLOUT_LABELERS, Labeler, StepSolution, check_labeler_name

AFTER_FIRST_ERROR = ("keep", "drop")


@dataclass(frozen=True)
class RefreshOptions:
    """The `prm` head's `refresh_*` options."""

    every: int = 0
    """RL steps between refreshes (0: the PRM stays frozen)."""
    labeler: str = "exact"
    """A registered labeler that needs no rollouts, or `package.module:function`."""
    rows: int = 0
    """Responses each rank labels per refresh, drawn at random (0: all it scored)."""
    lr: float = 1e-4
    epochs: int = 1
    """Passes over each refresh's labelled solutions."""
    after_first_error: str = "drop"
    """`drop`: label and train each solution only up to its first wrong step."""
    replay: str | None = None
    """A step dataset (the PRM's training data) replayed in every refresh, or None."""
    replay_rows: int = 0
    """Solutions of `replay` drawn per refresh (0: as many as the refresh's fresh ones)."""
    balance: bool = False
    """Weigh each refresh's good and bad step labels equally (class-balanced BCE)."""

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def check(self) -> None:
        """One-line ConfigError naming the first bad option."""
        if self.every < 0:
            raise ConfigError(f"prm head: refresh_every must be >= 0, got {self.every}")
        if not self.enabled:
            return
        if self.labeler in ROLLOUT_LABELERS:
            raise ConfigError(
                f"prm head: refresh_labeler {self.labeler!r} samples continuations, which the "
                "loop does not run; use 'exact' or a package.module:function teacher"
            )
        check_labeler_name(self.labeler)
        if self.rows < 0:
            raise ConfigError(f"prm head: refresh_rows must be >= 0, got {self.rows}")
        if not self.lr > 0:
            raise ConfigError(f"prm head: refresh_lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise ConfigError(f"prm head: refresh_epochs must be >= 1, got {self.epochs}")
        if self.after_first_error not in AFTER_FIRST_ERROR:
            raise ConfigError(
                f"prm head: refresh_after_first_error must be one of {list(AFTER_FIRST_ERROR)}, "
                f"got {self.after_first_error!r}"
            )
        if self.replay_rows < 0:
            raise ConfigError(f"prm head: refresh_replay_rows must be >= 0, got {self.replay_rows}")
        if self.replay is not None and not Path(self.replay).exists():
            raise ConfigError(f"prm head: refresh_replay {self.replay!r} does not exist")


@dataclass
class RefreshState:
    """What the refreshes have done so far (saved with the head's checkpoint)."""

    calls: int = 0
    """RL steps seen by `update` (the refresh is due when calls % every == 0)."""
    refreshes: int = 0
    teacher_labels: int = 0
    """Teacher step labels bought, all ranks."""
    solutions: int = 0
    """Solutions labelled, all ranks."""


def pick_rows(candidates: Sequence[int], rows: int, seed: int) -> list[int]:
    """`rows` of `candidates` at random (all of them when `rows` is 0 or larger), in order."""
    if rows == 0 or rows >= len(candidates):
        return list(candidates)
    chosen = torch.randperm(len(candidates), generator=seeded(seed))[:rows].tolist()
    return sorted(candidates[i] for i in chosen)


def solutions_of(
    problems: Sequence[str],
    steps: Sequence[Sequence[str]],
    answers: Sequence[Any] | None,
    outcomes: Sequence[float],
    rows: Sequence[int],
) -> list[StepSolution]:
    """The solutions of batch `rows` for a labeler (rows without a step are left out)."""
    return [
        StepSolution(
            prompt=problems[b],
            steps=list(steps[b]),
            answer=None if answers is None else str(answers[b]),
            outcome=float(outcomes[b]),
            extra={"row": b},
        )
        for b in rows
        if steps[b]
    ]


def label(
    labeler: Labeler, solutions: Sequence[StepSolution], after_first_error: str
) -> list[StepExample]:
    """The labeler's examples, cut after the first wrong step with `drop` (labels after it
    are not bought)."""
    examples = labeler(solutions) if solutions else []
    if after_first_error == "drop":
        examples = [until_first_error(ex) for ex in examples]
    return examples


def on_policy_scores(
    probs: Sequence[Sequence[float]], examples: Sequence[StepExample], threshold: float
) -> dict[str, float]:
    """The PRM's scores on freshly labelled solutions, before it learns from them.

    probs: [N][H_i] P(good) of each example's steps (at least as many as its labels) ->
    {"f1": first-error F1, "error_recall": share of first wrong steps it calls the first
    error}; NaN where the examples hold no case to score (F1 needs both right and wrong
    solutions, the recall a wrong one)."""
    cut = [list(p[: len(ex.labels)]) for p, ex in zip(probs, examples, strict=True)]
    labels = [list(ex.labels) for ex in examples]
    if not labels:
        return {"f1": float("nan"), "error_recall": float("nan")}
    scores = prm_scores(cut, labels, threshold)
    wrong = [(row, first_bad(y)) for row, y in zip(cut, labels, strict=True) if first_bad(y) >= 0]
    hits = sum(first_error_from_step_values(row, threshold) == h for row, h in wrong)
    recall = hits / len(wrong) if wrong else float("nan")
    f1 = scores["f1"]  # None without both right and wrong solutions
    return {"f1": float("nan") if f1 is None else float(f1), "error_recall": recall}


def load_replay(path: str, after_first_error: str) -> list[StepExample]:
    """The replay dataset's examples, cut as the refresh cuts its own (`read_step_dataset`
    names the file and row of bad input, and an empty file)."""
    from rl.prm.data import read_step_dataset

    examples = read_step_dataset(path)
    if after_first_error == "drop":
        examples = [until_first_error(ex) for ex in examples]
    return examples


def draw_replay(pool: Sequence[StepExample], rows: int, fresh: int, seed: int) -> list[StepExample]:
    """`rows` examples of `pool` at random (`fresh` of them when `rows` is 0), without
    replacement; the same on every rank for the same seed."""
    count = min(rows or fresh, len(pool))
    chosen = torch.randperm(len(pool), generator=seeded(seed))[:count].tolist()
    return [pool[i] for i in sorted(chosen)]


def class_weights(examples: Sequence[StepExample]) -> tuple[float, float]:
    """(weight of a good label, weight of a bad one) so both classes weigh half of the
    examples' labels in all: n / (2 n_good), n / (2 n_bad); (1, 1) when a class is absent."""
    good = sum(bool(y) for ex in examples for y in ex.labels)
    total = sum(len(ex.labels) for ex in examples)
    bad = total - good
    if good == 0 or bad == 0:
        return 1.0, 1.0
    return total / (2 * good), total / (2 * bad)


def balanced_loss(good_weight: float, bad_weight: float) -> LossFn:
    """`rl.prm.fitting.train_epoch`'s loss with each tag's BCE weighted by its label's class
    weight (`class_weights`; the weights of a batch's tags sum to its tag count on average)."""

    def loss(
        z: Tensor, batch: dict[str, Tensor], weight: Tensor, index: list[int]
    ) -> tuple[Tensor, Tensor]:
        del index
        targets = batch["targets"].to(z.device)  # [b, H]
        step_mask = batch["step_mask"].to(z.device)
        per_tag = torch.where(targets > 0.5, good_weight, bad_weight) * step_mask
        loss_sum, _ = tag_bce(z, targets, per_tag, weight.to(z.device))
        count = (step_mask * weight.to(z.device).unsqueeze(1)).sum()
        return loss_sum, count

    return loss


def gather_examples(items: list[Any]) -> list[Any]:
    """Every rank's `items` (labelled examples, with what goes with them), rank by rank, on
    every rank (collective)."""
    return [item for part in eng.all_gather_objects(items) for item in part]


def train_on(
    engine: Any,
    model: Any,
    tokenizer: Any,
    examples: Sequence[StepExample],
    dist: eng.DistInfo,
    micro_batch_size: int,
    epochs: int,
    seed: int,
    balance: bool = False,
) -> float:
    """`epochs` passes of the PRM over `examples` (the same list on every rank: each rank
    trains on its share), with class-balanced BCE when `balance`; returns the last pass's
    mean (weighted) BCE over all ranks' tags."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = render_examples(examples, model.convention, tokenizer, model.ids.tag)
    loss_fn = balanced_loss(*class_weights(examples)) if balance else None
    loss = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=seeded(seed + epoch)).tolist()
        if loss_fn is None:
            loss = train_epoch(engine, rows, order, dist, micro_batch_size, pad)
        else:
            loss = train_epoch(engine, rows, order, dist, micro_batch_size, pad, loss_fn=loss_fn)
    engine.eval()
    return loss
