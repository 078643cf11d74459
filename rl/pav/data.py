"""Monte-Carlo value labels for PAV (Setlur et al. 2024; Math-Shepherd-style rollouts).

For a prompt x and a solution y sampled from the base policy pi, cut into steps 1..H:

- the **step prefixes** are the bare prompt (s_0) and the prompt followed by y up to the end of
  each step h < H (`step_prefixes`);
- `Q^pi` of a prefix is the share of `n_mc` continuations sampled from pi after it whose
  completed response (the prefix's response text + the continuation) the verifier accepts
  (`estimate_prefix_values`);
- after the final step the response is finished, so its label is the solution's own verifier
  outcome (no rollouts).

A solution's labels `[Q(s_0), Q(s_1), ..., Q(s_H)]` (H+1 numbers) sit on the last prompt token
and on each step's last token; `collate` turns solutions into padded training tensors for the
verifier (one forward pass reads every label of a solution: the model is causal).

Departure: continuations get the full `max_new_tokens` budget from every prefix (not what the
solution had left), so prefixes near the length limit are valued slightly optimistically.

Data generation (`generate_mc_data`) appends one JSON record per solution to
`<pav.output_dir>/mc_data.rank{r}.jsonl` after each batch of prompts; a restarted run reads all
rank files, skips the prompts already complete (all their solutions written) and continues.
Records of a prompt interrupted mid-write are superseded by the rerun (the newest record of a
(prompt, sample) pair wins). The directory must be visible to every rank (a shared filesystem,
as for checkpoints).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rl.core.errors import ConfigError
from rl.data.jsonl import append_jsonl
from rl.data.prompts import batch_columns
from rl.rollout.backend import RolloutBackend, SamplingSettings
from rl.rollout.mc_values import (  # noqa: F401  (re-exported for the PAV pipeline)
    Verifier,
    estimate_prefix_values,
    prefix_texts,
    q_table,
    solution_labels,
    step_prefixes,
    success_rates,
)
from rl.rollout.steps import response_step_spans

DATA_GLOB = "mc_data.rank*.jsonl"
META_FILE = "mc_data.meta.json"


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass
class SolutionRecord:
    """One sampled solution with its Monte-Carlo labels (one JSON line)."""

    prompt_index: int
    """`PromptRow.index` of the prompt (row number in the training source)."""
    sample: int
    """0 .. samples_per_prompt - 1."""
    prompt_ids: list[int]
    """[P] prompt tokens, no padding."""
    response_ids: list[int]
    """[R] the sampled response's valid tokens (EOS included when it was sampled)."""
    step_ends: list[int]
    """[H] response index of each step's last token."""
    labels: list[float]
    """[H+1] (or [] when H = 0): Q^pi of the bare prompt, then after each step; the last is
    the solution's verifier outcome."""
    completion: str
    """The decoded response (for inspection)."""

    def label_positions(self) -> list[int]:
        """Index in `prompt_ids + response_ids` of each label: [H+1]."""
        if not self.labels:
            return []
        p = len(self.prompt_ids)
        return [p - 1] + [p + e for e in self.step_ends]


def append_records(path: Path, records: Iterable[SolutionRecord]) -> None:
    """Append records as JSON lines in one flushed write (`rl.data.jsonl.append_jsonl`): a
    kill loses at most the batch being written."""
    append_jsonl(path, (asdict(r) for r in records))


def read_records(paths: Iterable[Path]) -> list[SolutionRecord]:
    """Every valid record of the files, the newest one per (prompt_index, sample) kept;
    unparseable lines (a run killed mid-write) are skipped."""
    newest: dict[tuple[int, int], SolutionRecord] = {}
    for path in sorted(paths):
        for line in path.read_text().splitlines():
            try:
                record = SolutionRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            newest[(record.prompt_index, record.sample)] = record
    return list(newest.values())


def complete_prompts(records: Iterable[SolutionRecord], samples_per_prompt: int) -> set[int]:
    """Prompt indices that have a record for every sample 0..samples_per_prompt-1."""
    seen: dict[int, set[int]] = {}
    for r in records:
        seen.setdefault(r.prompt_index, set()).add(r.sample)
    want = set(range(samples_per_prompt))
    return {p for p, s in seen.items() if want <= s}


def check_meta(output_dir: Path, meta: dict[str, Any]) -> None:
    """ConfigError if `output_dir` holds MC data made with other settings (naming the key)."""
    path = output_dir / META_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    key = first_difference(old, meta)
    if key is not None:
        raise ConfigError(
            f"{output_dir} holds Monte-Carlo data made with {key}={old.get(key)!r}, but the "
            f"config gives {meta.get(key)!r}: delete {output_dir} or set another "
            "pav.output_dir"
        )


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key (sorted) whose value differs between two metas, or None."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return key
    return None


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


PLACEHOLDER_LABEL = 0.5
"""A candidate's label before Monte-Carlo labelling (see `sample_candidates`)."""


def sample_candidates(
    rollout: RolloutBackend,
    model: Any,
    tokenizer: Any,
    rows: Sequence[Any],
    verifier: Verifier,
    sampling: SamplingSettings,
    samples_per_prompt: int,
    delimiter: str,
) -> list[SolutionRecord]:
    """Sample `samples_per_prompt` solutions for each `PromptRow`, not yet labelled: a
    candidate's labels are H placeholders (`PLACEHOLDER_LABEL`) and its verifier outcome last
    (the outcome costs no rollout); a solution without steps has no labels."""
    sols = rollout.rollout(
        model,
        [r.prompt_ids for r in rows],
        [r.text for r in rows],
        batch_columns(rows),
        sampling,
        samples_per_prompt,
    )
    outcome = verifier(sols.prompts, sols.completions, sols.columns).tolist()  # [B]
    lengths = sols.response_mask.sum(dim=1).long().tolist()  # [B]
    candidates = []
    for b, n in enumerate(lengths):
        row = rows[b // samples_per_prompt]
        response = sols.response_ids[b, :n].tolist()
        ends = [end for _, end in response_step_spans(tokenizer, response, delimiter)]
        candidates.append(
            SolutionRecord(
                prompt_index=row.index,
                sample=b % samples_per_prompt,
                prompt_ids=list(row.prompt_ids),
                response_ids=response,
                step_ends=ends,
                labels=solution_labels([PLACEHOLDER_LABEL] * len(ends), float(outcome[b])),
                completion=sols.completions[b],
            )
        )
    return candidates


def mc_label(
    rollout: RolloutBackend,
    model: Any,
    tokenizer: Any,
    candidates: Sequence[SolutionRecord],
    rows_by_index: dict[int, Any],
    verifier: Verifier,
    sampling: SamplingSettings,
    n_mc: int,
) -> tuple[list[SolutionRecord], int]:
    """Label the candidates' step prefixes by `n_mc` rollouts each. `rows_by_index`: the
    `PromptRow` of every candidate's prompt. Returns (records, prefixes rolled out)."""
    prefixes: list[list[int]] = []
    texts: list[str] = []
    prompts: list[str] = []
    owner_rows: list[Any] = []
    for c in candidates:
        row = rows_by_index[c.prompt_index]
        found = step_prefixes(c.prompt_ids, c.response_ids, c.step_ends)
        prefixes += found
        texts += prefix_texts(tokenizer, c.response_ids, c.step_ends)
        prompts += [row.text] * len(found)
        owner_rows += [row] * len(found)
    values = estimate_prefix_values(
        rollout,
        model,
        prefixes,
        texts,
        prompts,
        batch_columns(owner_rows),
        verifier,
        sampling,
        n_mc,
    ).tolist()  # [N]
    records = []
    start = 0
    for c in candidates:
        h = len(c.step_ends)
        labels = solution_labels(values[start : start + h], c.labels[-1]) if h else []
        records.append(replace(c, labels=labels))
        start += h
    return records, len(prefixes)


def label_solutions(
    rollout: RolloutBackend,
    model: Any,
    tokenizer: Any,
    rows: Sequence[Any],
    verifier: Verifier,
    sampling: SamplingSettings,
    samples_per_prompt: int,
    n_mc: int,
    delimiter: str,
) -> tuple[list[SolutionRecord], int]:
    """Sample `samples_per_prompt` solutions for each `PromptRow` and label their step
    prefixes by rollouts. Returns (records, number of prefixes rolled out)."""
    candidates = sample_candidates(
        rollout, model, tokenizer, rows, verifier, sampling, samples_per_prompt, delimiter
    )
    rows_by_index = {r.index: r for r in rows}
    return mc_label(rollout, model, tokenizer, candidates, rows_by_index, verifier, sampling, n_mc)


def generate_mc_data(
    rollout: RolloutBackend,
    model: Any,
    tokenizer: Any,
    rows: Sequence[Any],
    path: Path,
    verifier: Verifier,
    sampling: SamplingSettings,
    *,
    samples_per_prompt: int,
    n_mc: int,
    delimiter: str,
    prompts_per_batch: int,
    bar: Any = None,
) -> int:
    """Label `rows` (this rank's prompts still to do) batch by batch, appending each batch's
    records to `path`. `bar`: a tqdm bar in prefixes (its total is re-estimated as batches
    finish), or None. Returns the number of prefixes rolled out."""
    done_prefixes = 0
    for start in range(0, len(rows), prompts_per_batch):
        batch = rows[start : start + prompts_per_batch]
        records, n_prefixes = label_solutions(
            rollout,
            model,
            tokenizer,
            batch,
            verifier,
            sampling,
            samples_per_prompt,
            n_mc,
            delimiter,
        )
        append_records(path, records)
        done_prefixes += n_prefixes
        if bar is not None:
            done_rows = start + len(batch)
            bar.total = max(bar.n + n_prefixes, math.ceil(done_prefixes * len(rows) / done_rows))
            bar.update(n_prefixes)
            bar.set_postfix(prompts=f"{done_rows}/{len(rows)}")
    return done_prefixes


# ----------------------------------------------------------------------------------------------
# Training tensors
# ----------------------------------------------------------------------------------------------


@dataclass
class LabelBatch:
    """Padded verifier inputs for b solutions: prompt left-padded to Tp, response right-padded."""

    input_ids: Tensor
    """[b, Tp + Tr] int64."""
    attention_mask: Tensor
    """[b, Tp + Tr] 0/1."""
    labels: Tensor
    """[b, Tp + Tr] float soft labels in [0, 1] at labelled positions, 0 elsewhere."""
    label_mask: Tensor
    """[b, Tp + Tr] float 1 at labelled positions (last prompt token, step-end tokens)."""


def collate(records: Sequence[SolutionRecord], pad_id: int) -> LabelBatch:
    """Pad solutions into one `LabelBatch` (see `SolutionRecord.label_positions`)."""
    tp = max(len(r.prompt_ids) for r in records)
    tr = max(len(r.response_ids) for r in records)
    b = len(records)
    ids = torch.full((b, tp + tr), pad_id, dtype=torch.long)
    mask = torch.zeros(b, tp + tr, dtype=torch.long)
    labels = torch.zeros(b, tp + tr)
    label_mask = torch.zeros(b, tp + tr)
    for i, r in enumerate(records):
        offset = tp - len(r.prompt_ids)  # left padding of this prompt
        seq = r.prompt_ids + r.response_ids
        ids[i, offset : offset + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, offset : offset + len(seq)] = 1
        for pos, value in zip(r.label_positions(), r.labels, strict=True):
            labels[i, offset + pos] = value
            label_mask[i, offset + pos] = 1.0
    return LabelBatch(ids, mask, labels, label_mask)
