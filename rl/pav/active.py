"""Active labelling for the PAV verifier (ActPRM, Duan et al. 2025).

The expensive part of a PAV verifier is its Monte-Carlo labels: `n_mc` rollouts from every
step prefix. With `pav.label_fraction` < 1, `launch/train_pav.py` labels only part of the
solutions it samples, in rounds:

1. The held-out prompts (`pav.val_fraction`) are labelled in full first, as in the plain
   pipeline; their rollouts are counted apart (they measure, they do not train).
2. The training prompts are cut into rounds of `pav.label_round_prompts`. In each round every
   rank samples solutions for its share of the round's prompts (`candidates.rank{r}.jsonl`);
   all ranks read all of the round's candidates.
3. The round's candidates are ranked and the first `ceil(label_fraction * n)` are labelled:
   `label_select: random` ranks them in a seeded random order (uniform labelling);
   `uncertainty` ranks them by the selection ensemble's `uncertainty` (below). The first
   round has no trained ensemble and is ranked at random either way.
4. Each rank rolls out the selected candidates it sampled and appends them to its
   `mc_data.rank{r}.jsonl`; rank 0 appends the skipped ones to `skipped.jsonl`.
5. The selection ensemble (`EnsembleValueModel`: `pav.ensemble_heads` linear heads on one
   backbone, initialised from the base policy) trains `pav.selector_epochs` passes over all
   labels so far (BCE per head; each head sees a fixed random half of the solutions, a
   bootstrap that keeps the heads apart).

The verifier itself is then trained from scratch on the labelled solutions exactly as in the
plain pipeline (rl/pav/train.py), so the selection rule changes which labels are bought, not
how the verifier learns from them.

Uncertainty of a candidate (ActPRM keeps a sample when any step is uncertain in either
sense; we rank by the larger of the two, so that a fixed fraction can be kept): at each of its
labelled positions, with p_k the heads' predicted success probabilities,
    aleatoric = 1 - 2 |mean_k p_k - 0.5|     (1 when the ensemble predicts 0.5),
    epistemic = 2 std_k p_k                   (1 at the largest possible disagreement),
and the candidate's score is the maximum of both over its positions (0 without steps);
`pav.uncertainty: epistemic` keeps the epistemic term only (soft Monte-Carlo labels near 0.5
are noisy by nature: a confident 0.5 is not a reason to buy a label).

Resume: a restarted run skips the rounds whose solutions are all labelled or skipped, retrains
the ensemble `selector_epochs` passes over the labels so far and redoes an interrupted round
from its sampling (the labels a killed round had already bought are kept and counted).

`pav.label_pool`: the candidates and their labels are read from the Monte-Carlo data of an
earlier run with the same data settings instead of sampled and rolled out. The rollouts a
label took are still counted, so selection rules can be compared on the same labels.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl.core.batching import plan_micro_batches
from rl.core.errors import ConfigError, DataError
from rl.data.prompts import PromptRow, seeded
from rl.engine import deepspeed_engine as eng
from rl.pav.data import (
    DATA_GLOB,
    META_FILE,
    PLACEHOLDER_LABEL,
    LabelBatch,
    SolutionRecord,
    append_records,
    collate,
    first_difference,
    read_records,
)
from rl.pav.fitting import make_value_engine, train_epoch

SELECT_RULES = ("uncertainty", "random")
UNCERTAINTY_KINDS = ("max", "epistemic")
CANDIDATES_GLOB = "candidates.rank*.jsonl"
SKIPPED_FILE = "skipped.jsonl"


# ----------------------------------------------------------------------------------------------
# Pure selection maths
# ----------------------------------------------------------------------------------------------


def n_selected(n: int, fraction: float) -> int:
    """Candidates labelled out of `n` at `fraction` in (0, 1]: ceil(fraction * n)."""
    return min(n, math.ceil(fraction * n - 1e-9))


def uncertainty(probs: Tensor, mask: Tensor, kind: str = "max") -> Tensor:
    """Per-candidate uncertainty in [0, 1] (module docstring).

    probs: [K, B, T] each head's P(success) at every position; mask: [B, T] 1 at labelled
    positions -> [B]: max over labelled positions of max(aleatoric, epistemic) (`kind`
    "max") or of the epistemic term alone ("epistemic"); 0 for a row without labelled
    positions.
    """
    epistemic = 2.0 * probs.std(dim=0, correction=0)  # [B, T]
    if kind == "epistemic":
        per_position = epistemic * mask
    else:
        aleatoric = 1.0 - 2.0 * (probs.mean(dim=0) - 0.5).abs()  # [B, T]
        per_position = torch.maximum(aleatoric, epistemic) * mask  # [B, T]
    return per_position.max(dim=1).values.clamp(min=0.0)  # [B]


def rank_candidates(scores: Sequence[float] | None, n: int, seed: int) -> list[int]:
    """Candidate indices, most worth labelling first: by descending score (ties by index), or
    in a seeded random order when `scores` is None."""
    if scores is None:
        return torch.randperm(n, generator=seeded(seed)).tolist()
    return sorted(range(n), key=lambda i: (-scores[i], i))


def bootstrap_mask(keys: Sequence[tuple[int, int]], heads: int, seed: int) -> Tensor:
    """[B, K] 0/1: which heads train on each solution (keyed by (prompt, sample)). Each head
    sees a fixed random half; a solution no head drew goes to one head (so none is wasted)."""
    mask = torch.zeros(len(keys), heads)
    for b, (prompt, sample) in enumerate(keys):
        rng = random.Random(f"{seed}:{prompt}:{sample}")
        draws = [rng.random() < 0.5 for _ in range(heads)]
        if not any(draws):
            draws[rng.randrange(heads)] = True
        mask[b] = torch.tensor(draws, dtype=torch.float32)
    return mask


def rollouts_of(record: SolutionRecord, n_mc: int) -> int:
    """Continuations its labels took: n_mc per step prefix (the outcome label is free)."""
    return n_mc * max(0, len(record.labels) - 1)


def as_candidate(record: SolutionRecord) -> SolutionRecord:
    """The record with its rollout labels hidden (placeholders), its outcome kept."""
    if not record.labels:
        return record
    return replace(
        record, labels=[PLACEHOLDER_LABEL] * (len(record.labels) - 1) + [record.labels[-1]]
    )


def rounds_of(prompts: Sequence[int], per_round: int) -> list[list[int]]:
    """Consecutive rounds of `per_round` prompt indices (the last may be shorter)."""
    return [list(prompts[i : i + per_round]) for i in range(0, len(prompts), per_round)]


# ----------------------------------------------------------------------------------------------
# The selection ensemble
# ----------------------------------------------------------------------------------------------


class EnsembleValueModel(nn.Module):
    """A backbone with `heads` linear value heads: forward -> logits [B, T, K] (PAV's
    selection reads them as value logits, the PRM's as log-odds that a step is good)."""

    def __init__(self, backbone: Any, heads: int, seed: int) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        self.value_heads = nn.Linear(hidden, heads)
        with torch.no_grad():  # heads start apart (a zero init would keep them identical)
            self.value_heads.weight.normal_(0.0, hidden**-0.5, generator=seeded(seed))
            self.value_heads.bias.zero_()
        self.config: Any = backbone.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: [B, T] -> float32 logits [B, T, K]."""
        from rl.core.types import position_ids_from_mask

        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state  # [B, T, H]
        return self.value_heads(hidden.to(self.value_heads.weight.dtype)).float()  # [B, T, K]


def ensemble_bce_terms(
    logits: Tensor, batch: LabelBatch, weight: Tensor, head_mask: Tensor
) -> dict[str, Any]:
    """Sum-form BCE of every head at the labelled positions of its bootstrap rows.

    logits: [b, T, K]; weight: [b] 0/1 (padding rows 0); head_mask: [b, K] ->
    {"bce": differentiable sum, "count": (position, head) pairs summed over}.
    """
    labels = batch.labels.to(logits.device).unsqueeze(-1).expand_as(logits)  # [b, T, K]
    mask = batch.label_mask.to(logits.device).unsqueeze(-1) * (
        weight.to(logits.device).unsqueeze(1) * head_mask.to(logits.device)
    ).unsqueeze(1)  # [b, T, K]
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return {"bce": (bce * mask).sum(), "count": mask.sum()}


@dataclass
class Selector:
    """The selection ensemble as a DeepSpeed engine, trained and read by every rank."""

    engine: Any
    dist: eng.DistInfo
    micro_batch_size: int
    pad_id: int
    seed: int
    heads: int
    kind: str = "max"
    """`uncertainty`'s kind (`pav.uncertainty`)."""
    trained: bool = False
    history: list[float] = field(default_factory=list)

    def train(self, records: Sequence[SolutionRecord], epochs: int, round_index: int) -> None:
        """`epochs` passes over `records` (the same list on every rank); logs the mean BCE."""
        records = [r for r in records if r.labels]
        if not records or epochs < 1:
            return
        masks = bootstrap_mask([(r.prompt_index, r.sample) for r in records], self.heads, self.seed)

        def terms(logits: Tensor, batch: LabelBatch, weight: Tensor, index: list[int]) -> Any:
            return ensemble_bce_terms(logits, batch, weight, masks[index])

        for epoch in range(epochs):
            order = torch.randperm(
                len(records), generator=seeded(self.seed + 7919 * round_index + epoch)
            ).tolist()
            bce = train_epoch(
                self.engine,
                records,
                order,
                self.dist,
                self.micro_batch_size,
                self.pad_id,
                None,
                terms,
            )
        self.history.append(bce)
        self.trained = True

    @torch.no_grad()
    def score(self, candidates: Sequence[SolutionRecord]) -> list[float]:
        """`uncertainty` of every candidate (the same list on every rank) -> [N], all ranks."""
        self.engine.eval()
        scores = torch.zeros(len(candidates), dtype=torch.float64)
        order = list(range(len(candidates)))
        for index, real in plan_micro_batches(
            order, self.dist.world_size, self.dist.rank, self.micro_batch_size
        ):
            batch = collate([candidates[i] for i in index], self.pad_id)
            logits = self.engine(
                input_ids=batch.input_ids.to(self.engine.device),
                attention_mask=batch.attention_mask.to(self.engine.device),
            )  # [b, T, K]
            probs = torch.sigmoid(logits).permute(2, 0, 1).cpu()  # [K, b, T]
            found = uncertainty(probs, batch.label_mask, self.kind).double()  # [b]
            for i, keep, value in zip(index, real, found.tolist(), strict=True):
                if keep:
                    scores[i] = value
        self.engine.train()
        return eng.all_reduce_sum(scores).tolist()


def make_selector(cfg: Any, dist: eng.DistInfo, model_path: str, pad_id: int) -> Selector:
    """A fresh selection ensemble from the base policy's backbone, as a DeepSpeed engine with
    the verifier's optimizer settings (`pav.lr`, `pav.micro_batch_size`)."""
    from transformers import AutoModel

    from rl.engine.models import run_dtype

    pav = cfg.pav
    backbone = AutoModel.from_pretrained(model_path, dtype=run_dtype(cfg))
    model = EnsembleValueModel(backbone, pav.ensemble_heads, cfg.seed).to(run_dtype(cfg))
    engine = make_value_engine(cfg, dist, model)
    return Selector(
        engine, dist, pav.micro_batch_size, pad_id, cfg.seed, pav.ensemble_heads, pav.uncertainty
    )


# ----------------------------------------------------------------------------------------------
# Where candidates and labels come from
# ----------------------------------------------------------------------------------------------


SampleFn = Callable[[list[PromptRow]], list[SolutionRecord]]
"""This rank's prompts -> their candidates (rollout labels hidden)."""
LabelFn = Callable[[list[SolutionRecord]], list[SolutionRecord]]
"""Candidates -> labelled records."""


def pool_source(pool_dir: str | Path, meta: dict[str, Any]) -> tuple[SampleFn, LabelFn]:
    """Candidates and labels looked up in an earlier run's Monte-Carlo data (`pav.label_pool`),
    which must have been made with the same data settings (`meta`)."""
    pool = Path(pool_dir)
    meta_path = pool / META_FILE
    if not meta_path.is_file():
        raise ConfigError(f"pav.label_pool: {pool} holds no Monte-Carlo data ({META_FILE})")
    old = json.loads(meta_path.read_text())
    key = first_difference(old, meta)
    if key is not None:
        raise ConfigError(
            f"pav.label_pool: {pool} was made with {key}={old.get(key)!r}, but the config "
            f"gives {meta.get(key)!r}"
        )
    records = {(r.prompt_index, r.sample): r for r in read_records(pool.glob(DATA_GLOB))}
    by_prompt: dict[int, list[SolutionRecord]] = {}
    for r in records.values():
        by_prompt.setdefault(r.prompt_index, []).append(r)

    def sample(rows: list[PromptRow]) -> list[SolutionRecord]:
        missing = [r.index for r in rows if r.index not in by_prompt]
        if missing:
            raise DataError(f"pav.label_pool: {pool} has no solutions of prompts {missing[:5]}")
        found = [rec for r in rows for rec in sorted(by_prompt[r.index], key=lambda x: x.sample)]
        return [as_candidate(rec) for rec in found]

    def label(candidates: list[SolutionRecord]) -> list[SolutionRecord]:
        return [records[(c.prompt_index, c.sample)] for c in candidates]

    return sample, label


# ----------------------------------------------------------------------------------------------
# The rounds
# ----------------------------------------------------------------------------------------------


@dataclass
class ActiveResult:
    """What active labelling bought and skipped (for `train_pav_metrics.json`)."""

    rounds: int
    candidates: int
    labelled: int
    skipped: int
    mc_rollouts: int
    """Continuations spent on the training labels (the held-out ones are counted apart)."""
    mc_rollouts_all_candidates: int
    """What labelling every candidate would have spent."""
    selector_bce: list[float]


def label_rounds(
    cfg: Any,
    dist: eng.DistInfo,
    rows: list[PromptRow],
    sample: SampleFn,
    label: LabelFn,
    make: Callable[[], Selector] | None,
    bar: Any = None,
) -> ActiveResult:
    """Run the rounds over the training prompts `rows` (the same list on every rank); labelled
    records go to `<pav.output_dir>/mc_data.rank{r}.jsonl`. `make` builds the selection
    ensemble (None for random selection)."""
    pav = cfg.pav
    out = Path(pav.output_dir)
    by_index = {r.index: r for r in rows}
    selector: Selector | None = None  # built when a round first needs it
    done_rounds = 0
    for round_index, prompts in enumerate(
        rounds_of([r.index for r in rows], pav.label_round_prompts)
    ):
        labelled, skipped = _progress(out, pav.samples_per_prompt)
        if set(prompts) <= labelled | skipped:
            done_rounds += 1
            if bar is not None:
                bar.update(1)
            continue
        if selector is None and make is not None:
            selector = make()
        if selector is not None and not selector.trained and done_rounds:
            selector.train(_labelled_records(out, by_index), pav.selector_epochs, round_index)
        candidates = _round_candidates(out, dist, prompts, by_index, sample)
        scores = selector.score(candidates) if selector is not None and selector.trained else None
        order = rank_candidates(scores, len(candidates), cfg.seed + round_index)
        chosen = set(order[: n_selected(len(candidates), pav.label_fraction)])
        _buy(out, dist, prompts, candidates, chosen, scores, label)
        eng.barrier()
        done_rounds += 1
        if selector is not None:
            selector.train(_labelled_records(out, by_index), pav.selector_epochs, round_index)
        if bar is not None:
            bar.update(1)
    return _account(out, by_index, pav, done_rounds, selector)


def _round_candidates(
    out: Path,
    dist: eng.DistInfo,
    prompts: list[int],
    by_index: dict[int, PromptRow],
    sample: SampleFn,
) -> list[SolutionRecord]:
    """Sample this rank's share of the round's prompts (prompt i of the round goes to rank
    i % world), then read every rank's candidates: the same sorted list on every rank."""
    mine = [by_index[p] for p in prompts[dist.rank :: dist.world_size]]
    if mine:  # the last round may have fewer prompts than ranks
        append_records(out / f"candidates.rank{dist.rank}.jsonl", sample(mine))
    eng.barrier()
    wanted = set(prompts)
    return sorted(
        (c for c in read_records(out.glob(CANDIDATES_GLOB)) if c.prompt_index in wanted),
        key=lambda c: (c.prompt_index, c.sample),
    )


def _buy(
    out: Path,
    dist: eng.DistInfo,
    prompts: list[int],
    candidates: list[SolutionRecord],
    chosen: set[int],
    scores: list[float] | None,
    label: LabelFn,
) -> None:
    """Label the chosen candidates this rank sampled; rank 0 logs the skipped ones."""
    owners = {p: i % dist.world_size for i, p in enumerate(prompts)}
    to_label = [
        c for i, c in enumerate(candidates) if i in chosen and owners[c.prompt_index] == dist.rank
    ]
    if to_label:
        append_records(out / f"mc_data.rank{dist.rank}.jsonl", label(to_label))
    if dist.is_main:
        skip = [
            {
                "prompt_index": c.prompt_index,
                "sample": c.sample,
                "score": None if scores is None else scores[i],
            }
            for i, c in enumerate(candidates)
            if i not in chosen
        ]
        _append_skipped(out / SKIPPED_FILE, skip)


def _labelled_records(out: Path, by_index: dict[int, PromptRow]) -> list[SolutionRecord]:
    """The labelled training records so far, in a fixed order (the same on every rank)."""
    found = [r for r in read_records(out.glob(DATA_GLOB)) if r.prompt_index in by_index]
    return sorted(found, key=lambda r: (r.prompt_index, r.sample))


def _progress(out: Path, samples_per_prompt: int) -> tuple[set[int], set[int]]:
    """(prompts with labelled records, prompts with skipped ones): a prompt is done when its
    samples are all in one or the other."""
    records = read_records(out.glob(DATA_GLOB))
    skipped = _read_skipped(out / SKIPPED_FILE)
    keys = {(r.prompt_index, r.sample) for r in records} | skipped
    seen: dict[int, set[int]] = {}
    for p, s in keys:
        seen.setdefault(p, set()).add(s)
    done = {p for p, s in seen.items() if set(range(samples_per_prompt)) <= s}
    labelled = {r.prompt_index for r in records} & done
    return labelled, done - labelled


def _append_skipped(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()


def _read_skipped(path: Path) -> set[tuple[int, int]]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keys.add((int(row["prompt_index"]), int(row["sample"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by a kill
    return keys


def _account(
    out: Path, by_index: dict[int, PromptRow], pav: Any, rounds: int, selector: Selector | None
) -> ActiveResult:
    labelled = _labelled_records(out, by_index)
    skipped = {k for k in _read_skipped(out / SKIPPED_FILE) if k[0] in by_index}
    skipped -= {(r.prompt_index, r.sample) for r in labelled}
    candidates = {
        (c.prompt_index, c.sample): c
        for c in read_records(out.glob(CANDIDATES_GLOB))
        if c.prompt_index in by_index
    }
    return ActiveResult(
        rounds=rounds,
        candidates=len(labelled) + len(skipped),
        labelled=len(labelled),
        skipped=len(skipped),
        mc_rollouts=sum(rollouts_of(r, pav.n_mc) for r in labelled),
        mc_rollouts_all_candidates=sum(rollouts_of(c, pav.n_mc) for c in candidates.values()),
        selector_bce=list(selector.history) if selector is not None else [],
    )
