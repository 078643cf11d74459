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
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rl.core.errors import ConfigError, RewardError
from rl.rollout.backend import RolloutBackend, SamplingSettings
from rl.rollout.steps import response_step_spans

Verifier = Callable[[list[str], list[str], dict[str, list[Any]]], Tensor]
"""`fn(prompts [N], completions [N], columns {name: [N]}) -> outcome [N]` in [0, 1]."""

DATA_GLOB = "mc_data.rank*.jsonl"
META_FILE = "mc_data.meta.json"


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def step_prefixes(
    prompt_ids: Sequence[int], response_ids: Sequence[int], step_ends: Sequence[int]
) -> list[list[int]]:
    """Token prefixes whose value is estimated by rollouts for one solution.

    prompt_ids: [P] (no padding), response_ids: [R] (valid tokens), step_ends: [H] response
    index of each step's last token -> H lists: the bare prompt, then prompt + response up to
    and including the end of each step except the last (the finished response's value is its
    outcome). H = 0 -> [].
    """
    if not step_ends:
        return []
    prompt = list(prompt_ids)
    return [prompt] + [prompt + list(response_ids[: e + 1]) for e in step_ends[:-1]]


def prefix_texts(
    tokenizer: Any, response_ids: Sequence[int], step_ends: Sequence[int]
) -> list[str]:
    """The partial response (text) of each of `step_prefixes`' prefixes: "" for the bare
    prompt, then the response decoded up to each step end except the last -> [H]."""
    cuts = [0] + [e + 1 for e in step_ends[:-1]] if step_ends else []
    return [tokenizer.decode(list(response_ids[:c]), skip_special_tokens=True) for c in cuts]


def success_rates(success: Tensor, n_mc: int) -> Tensor:
    """Mean outcome of each prefix's continuations: [N * n_mc] (prefix-major) -> [N]."""
    if n_mc < 1 or success.numel() % n_mc:
        raise ValueError(f"{success.numel()} outcomes do not split into groups of n_mc={n_mc}")
    return success.float().reshape(-1, n_mc).mean(dim=1)  # [N]


def solution_labels(prefix_values: Sequence[float], outcome: float) -> list[float]:
    """[Q(s_0), ..., Q(s_{H-1})] from rollouts + the outcome as Q(s_H) -> H+1 labels
    (no steps -> no labels)."""
    return [*map(float, prefix_values), float(outcome)] if prefix_values else []


def q_table(
    prefix_values: Tensor, prefix_counts: Sequence[int], outcome: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-row Q^pi table for `rl.algos.credit.pav_step_advantages_batched`.

    prefix_values: [sum(counts)] the rollout values of every row's prefixes in order (row b has
    `prefix_counts[b]` = H_b of them: s_0..s_{H_b-1}); outcome: [B] -> (q_pi [B, H+1] with
    q_pi[b, :H_b] the prefix values and q_pi[b, H_b] the outcome, zero beyond;
    step_mask [B, H] float, 1 on the H_b valid steps). H = max H_b.
    """
    b = len(prefix_counts)
    h = max(prefix_counts, default=0)
    q_pi = torch.zeros(b, h + 1, dtype=torch.float32)
    step_mask = torch.zeros(b, h, dtype=torch.float32)
    start = 0
    for row, n in enumerate(prefix_counts):
        if n:
            labels = solution_labels(prefix_values[start : start + n].tolist(), float(outcome[row]))
            q_pi[row, : n + 1] = torch.tensor(labels)
            step_mask[row, :n] = 1.0
        start += n
    return q_pi, step_mask


# ----------------------------------------------------------------------------------------------
# Monte-Carlo estimation
# ----------------------------------------------------------------------------------------------


def estimate_prefix_values(
    rollout: RolloutBackend,
    model: Any,
    prefixes: list[list[int]],
    texts: list[str],
    prompts: list[str],
    columns: dict[str, list[Any]],
    verifier: Verifier,
    sampling: SamplingSettings,
    n_mc: int,
) -> Tensor:
    """Q^pi of N prefixes from `n_mc` continuations each -> [N].

    prefixes: N token lists (prompt + partial response); texts: [N] the partial
    responses as text (what the continuation is appended to before verification); prompts,
    columns: the N prefixes' prompt texts and dataset columns. The backend generates all
    N * n_mc continuations in its own batches.
    """
    if not prefixes:
        return torch.zeros(0)
    out = rollout.rollout(model, prefixes, prompts, columns, sampling, group_size=n_mc)
    completions = [texts[i // n_mc] + c for i, c in enumerate(out.completions)]
    success = verifier(out.prompts, completions, out.columns)  # [N * n_mc]
    return success_rates(success, n_mc)  # [N]


def make_verifier(fn_spec: Any) -> Verifier:
    """The outcome verifier from a `RewardFunctionConfig` (its weight is ignored); it must
    score in [0, 1]."""
    from rewards.base import RewardSpec, build_reward_fns, score_outcomes

    fns = build_reward_fns([RewardSpec(fn_spec.fn, 1.0, dict(fn_spec.kwargs))])

    def verify(prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> Tensor:
        _, per_fn = score_outcomes(fns, prompts, completions, columns)
        scores = next(iter(per_fn.values()))  # [N]
        if ((scores < 0) | (scores > 1)).any():
            raise RewardError(
                f"reward function {fn_spec.fn!r} is used as the verifier and must score in "
                f"[0, 1], got {float(scores.min())}..{float(scores.max())}"
            )
        return scores

    return verify


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
    """Append records as JSON lines in one write, flushed to disk (a kill loses at most the
    batch being written). A previous run's partial last line is closed first."""
    text = "".join(json.dumps(asdict(r)) + "\n" for r in records)
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text  # the partial line becomes one bad line, skipped on read
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


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
    for key in sorted(set(old) | set(meta)):
        if old.get(key) != meta.get(key):
            raise ConfigError(
                f"{output_dir} holds Monte-Carlo data made with {key}={old.get(key)!r}, but the "
                f"config gives {meta.get(key)!r}: delete {output_dir} or set another "
                "pav.output_dir"
            )


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


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
    from rl.data.prompts import batch_columns

    sols = rollout.rollout(
        model,
        [r.prompt_ids for r in rows],
        [r.text for r in rows],
        batch_columns(rows),
        sampling,
        samples_per_prompt,
    )
    outcome = verifier(sols.prompts, sols.completions, sols.columns)  # [B]
    lengths = sols.response_mask.sum(dim=1).long().tolist()  # [B]
    prefixes: list[list[int]] = []
    texts: list[str] = []
    owner: list[int] = []  # solution row of each prefix
    per_sol: list[tuple[list[int], list[int], list[int]]] = []
    for b, n in enumerate(lengths):
        row = rows[b // samples_per_prompt]
        response = sols.response_ids[b, :n].tolist()
        ends = [end for _, end in response_step_spans(tokenizer, response, delimiter)]
        per_sol.append((row.prompt_ids, response, ends))
        prefixes += step_prefixes(row.prompt_ids, response, ends)
        texts += prefix_texts(tokenizer, response, ends)
        owner += [b] * len(ends)
    values = estimate_prefix_values(
        rollout,
        model,
        prefixes,
        texts,
        [sols.prompts[b] for b in owner],
        {k: [v[b] for b in owner] for k, v in sols.columns.items()},
        verifier,
        sampling,
        n_mc,
    )  # [N]
    records = []
    start = 0
    for b, (prompt_ids, response, ends) in enumerate(per_sol):
        h = len(ends)
        records.append(
            SolutionRecord(
                prompt_index=rows[b // samples_per_prompt].index,
                sample=b % samples_per_prompt,
                prompt_ids=list(prompt_ids),
                response_ids=response,
                step_ends=ends,
                labels=solution_labels(values[start : start + h].tolist(), float(outcome[b])),
                completion=sols.completions[b],
            )
        )
        start += h
    return records, len(prefixes)


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
