"""ProcessBench-style evaluation of process reward heads: first-error prediction and its F1.

A labelled solution is `{"problem": str, "steps": list[str], "label": int}`: the index of
the first wrong step (0-based), or -1 if every step is right. A head predicts the first
error from its per-step estimate of the probability that the solution is still correct
after each step: the first step whose value is below `threshold` (default 0.5), or -1.
ProcessBench (Zheng et al. 2024) scores the exact-index accuracy on wrong solutions
(`acc_error`), the accuracy on right ones (predicting -1, `acc_correct`) and their
harmonic mean `F1 = 2 a_err a_cor / (a_err + a_cor)`. A value model of a weak policy (PAV's)
sits below 0.5 everywhere; `best_threshold` picks the cut-off with the best F1 on another
split (launch/eval_prm.py --tune-threshold-on validation).

Per-step values of a head (`head_step_values`) are its `step_values(batch) -> Tensor [B, Tr]`
(probabilities in [0, 1], checked) read at the step-end tokens. PAV heads return their
`Q^pi`; the `RewardHead` default takes the token rewards of `score` (validated by
`checked_score`) as log-odds increments: the value after step h is
`sigmoid(sum_{t <= end_h} r_t)`. For an implicit PRM the partial sum of its rewards is its
Q-value, trained as the log-odds of a correct outcome (docs/algorithms.md, "Implicit PRM"),
so this is its estimate that the solution is still correct. A head whose rewards are
normalised or baselined (not raw log-odds) should override `step_values`. An
  outcome head reads sigmoid(0) = 0.5 on every step but the last, which is not below 0.5, so
  with the default threshold only the last step can be flagged.

The batch a head sees (`build_head_batch`) is what the trainer hands it for a rollout: the
problem as the prompt (chat template as in `rl.data.prompts.prepare_prompts`, left padded), the
steps joined with the step delimiter plus EOS as the response (right padded), and step ends
by the trainer's rule (`rl.algos.credit.step_spans_from_offsets`). The steps found must be
exactly the given ones, so a given step may not contain the delimiter: for ProcessBench,
whose steps are paragraphs, use `reward.step_delimiter="\\n\\n"`. As in training, the
delimiter's token ends the step before it and EOS closes the last step, so the last step's
value is read on EOS. `columns` carries `prompt` (the raw problem) and the
rows' other keys (e.g. `answer`), as dataset columns do in training; `group_size` is 1.

Built-in labels (`builtin_labelled_solutions`): solutions of the arithmetic task with exact
labels; see that function. Importable without DeepSpeed.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from rewards.heads import HeadBatch, RewardHead
from rl.algos.credit import Span, batch_step_tensors, step_spans_from_offsets, tokens_to_steps
from rl.algos.first_error import first_error_from_step_values, processbench_scores
from rl.core.errors import ConfigError, DataError, RewardError, one_line
from rl.data.jsonl import jsonl_values
from rl.data.prompts import ChatTemplateMode, prepare_prompts
from rl.rollout.backend import left_pad
from rl.rollout.steps import decode_offsets
from rl.tasks import arith

Row = dict[str, Any]
"""A labelled solution: problem (str), steps (list[str]), label (int), optional columns."""

_ROW_KEYS = ("problem", "steps", "label")

# --------------------------------------------------------------------------------------------
# Predictions and scores
# --------------------------------------------------------------------------------------------


def trivial_baselines(labels: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Scores of the constant predictors "always -1" (no error) and "always step 0"."""
    return {
        "always_no_error": processbench_scores([-1] * len(labels), labels),
        "always_step_0": processbench_scores([0] * len(labels), labels),
    }


# --------------------------------------------------------------------------------------------
# Labelled data
# --------------------------------------------------------------------------------------------


def check_row(row: Any, where: str) -> Row:
    """`row` validated as a labelled solution; DataError prefixed with `where` if it is not."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in _ROW_KEYS:
        if key not in row:
            raise DataError(f"{where}: missing key {key!r} (keys: {', '.join(map(str, row))})")
    if not isinstance(row["problem"], str):
        raise DataError(f"{where}: 'problem' must be a string, got {type(row['problem']).__name__}")
    steps = row["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}: 'steps' must be a list of strings")
    if not steps:
        raise DataError(f"{where}: 'steps' is empty")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
        raise DataError(
            f"{where}: 'label' must be an integer in -1..{len(steps) - 1} "
            f"(-1 = no error; {len(steps)} steps), got {label!r}"
        )
    return dict(row)


def load_processbench_jsonl(path: str | Path, n: int | None = None) -> list[Row]:
    """Labelled solutions from a JSON-lines file in ProcessBench's format (keys `problem`,
    `steps`, `label`; others are kept as columns). Blank lines are skipped; the first `n`
    rows are taken. Errors are DataErrors naming the file and the 1-based line."""
    return [check_row(obj, where) for where, obj in jsonl_values(path, n)]


def builtin_labelled_solutions(
    task_kwargs: Mapping[str, Any] | None = None,
    split: str = "eval",
    n: int = 512,
    seed: int = 0,
) -> list[Row]:
    """`n` labelled solutions of the built-in arithmetic task, deterministic in the arguments.

    Problems are `rl.tasks.arith.sample_problems(split, n, ...)`. Exactly `n // 2` solutions
    (chosen at random) carry one error, the rest are right (label -1). Steps are the
    response's lines, the final "Answer: N" line included: it is step `n_steps`, as in
    `arith.first_error_step`. The wrong step is uniform over all `n_steps + 1` lines: on a
    step line the result is replaced by another value and the later lines continue from it
    (so the final answer follows from the slip, and is occasionally still right, e.g. after
    a "*0": a process error with a right answer); on the answer line alone the stated answer
    is a wrong value. Every label is checked against `arith.first_error_step`. Rows also
    carry `answer` (the right final value), a column some heads read.
    """
    try:
        cfg = arith.ArithConfig(**dict(task_kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.task: {e}") from e
    if split not in arith.SPLITS:
        raise DataError(f"builtin arith: unknown split {split!r}; valid: {', '.join(arith.SPLITS)}")
    problems = arith.sample_problems(split, n, cfg, seed)
    rng = random.Random(f"prm_eval/{split}/{seed}")
    has_error = [i < n // 2 for i in range(n)]
    rng.shuffle(has_error)
    rows: list[Row] = []
    for problem, wrong in zip(problems, has_error, strict=True):
        steps, label = _labelled_steps(problem, rng) if wrong else (arith.step_lines(problem), -1)
        completion = arith.STEP_DELIMITER.join(steps)
        if arith.first_error_step(problem, completion) != label:  # an internal bug, not input
            raise AssertionError(f"label {label} disagrees with first_error_step on {steps}")
        rows.append(
            {
                "problem": problem.prompt,
                "steps": steps,
                "label": label,
                "answer": str(problem.answer),
            }
        )
    return rows


def _labelled_steps(problem: arith.ArithProblem, rng: random.Random) -> tuple[list[str], int]:
    """(lines, first wrong line) with one error at a uniformly random line."""
    n_steps = len(problem.ops)
    step = rng.randrange(n_steps + 1)
    right = problem.values()[step + 1] if step < n_steps else problem.answer
    wrong_value = rng.choice([v for v in range(problem.modulus) if v != right])
    if step < n_steps:
        return arith.step_lines(problem, step, wrong_value), step
    lines = arith.step_lines(problem)
    lines[-1] = f"{arith.ANSWER_PREFIX}{wrong_value}"
    return lines, step


# --------------------------------------------------------------------------------------------
# Head batches from text
# --------------------------------------------------------------------------------------------


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; responses must end with one")
    return int(eos)


def _check_step_texts(steps: Sequence[str], delimiter: str, where: str) -> None:
    for h, step in enumerate(steps):
        if delimiter in step:
            raise DataError(
                f"{where}: step {h} contains the step delimiter {delimiter!r} "
                "(set reward.step_delimiter to what separates the steps)"
            )
        if not step.strip():
            raise DataError(f"{where}: step {h} is empty or blank")


def _ids_and_offsets(tokenizer: Any, text: str) -> tuple[list[int], str, list[tuple[int, int]]]:
    """(ids, text the offsets index, per-token char offsets) of `text`, no special tokens.

    A fast tokenizer's offset mapping when it has one; else incremental decoding as in
    training (`decode_offsets`), which costs O(T^2) decoded characters: too slow for
    long solutions with a fast tokenizer at hand, and the same spans for text tokenised here.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        return [int(i) for i in enc["input_ids"]], text, offsets
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    decoded, offsets = decode_offsets(tokenizer, ids)
    return ids, decoded, offsets


def response_ids_and_spans(
    tokenizer: Any, steps: Sequence[str], delimiter: str, where: str = "row"
) -> tuple[list[int], list[Span]]:
    """(response token ids `[Tr_b]`: the steps joined with `delimiter` then EOS, step spans)
    of one solution, by `rl.algos.credit.step_spans_from_offsets` (the trainer's rule). DataError
    if the spans do not reproduce `steps` (a step with the delimiter or blank, or a token
    that runs across a step boundary)."""
    _check_step_texts(steps, delimiter, where)
    ids, text, offsets = _ids_and_offsets(tokenizer, delimiter.join(steps))
    ids.append(_eos_id(tokenizer))
    offsets.append((len(text), len(text)))  # EOS: no characters, it joins the last step
    spans = step_spans_from_offsets(text, offsets, delimiter)
    found = [text[offsets[a][0] : offsets[b][1]].replace(delimiter, " ").strip() for a, b in spans]
    if found != [s.strip() for s in steps]:
        raise DataError(
            f"{where}: the response's tokens split into steps {found!r}, not the given "
            f"{[s.strip() for s in steps]!r} (a token runs across a step boundary?)"
        )
    return ids, spans


def build_head_batch(
    rows: Sequence[Row],
    tokenizer: Any,
    *,
    delimiter: str = "\n",
    apply_chat_template: ChatTemplateMode = "auto",
    source: str = "eval data",
    first_index: int = 0,
) -> HeadBatch:
    """The `HeadBatch` of B labelled solutions (see the module docstring). Messages name rows
    `{source} row {first_index + position}` (0-based in the whole evaluation set)."""
    prompt_rows, _ = prepare_prompts(
        [{"prompt": r["problem"]} for r in rows],
        tokenizer,
        source=source,
        prompt_column="prompt",
        answer_column=None,
        max_prompt_tokens=sys.maxsize,  # no skipping: every labelled row is scored
        apply_chat_template=apply_chat_template,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    responses, spans = [], []
    for i, row in enumerate(rows):
        ids, row_spans = response_ids_and_spans(
            tokenizer, row["steps"], delimiter, where=f"{source} row {first_index + i}"
        )
        responses.append(ids)
        spans.append(row_spans)
    prompt_ids, prompt_mask = left_pad([p.prompt_ids for p in prompt_rows], pad_id)  # [B, Tp]
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, Tr]
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, ids in enumerate(responses):
        response_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[b, : len(ids)] = 1
    step_end, step_id = batch_step_tensors(spans, width)
    extra = sorted(set.intersection(*(set(r) for r in rows)) - set(_ROW_KEYS))
    columns = {"prompt": [r["problem"] for r in rows]}
    columns.update({k: [r[k] for r in rows] for k in extra})
    return HeadBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_mask=response_mask.float(),
        prompt_length=int(prompt_ids.shape[1]),
        step_id=step_id,
        step_end=step_end,
        completions=[delimiter.join(r["steps"]) for r in rows],
        group_size=1,
        prompts=[p.text for p in prompt_rows],
        columns=columns,
    )


# --------------------------------------------------------------------------------------------
# Scoring a head
# --------------------------------------------------------------------------------------------


def _checked_step_values(head: RewardHead, batch: HeadBatch) -> Tensor:
    """`head.step_values(batch)` validated: [B, Tr], finite and in [0, 1] at step ends."""
    name = head.name
    try:
        values = head.step_values(batch)
    except Exception as e:
        raise RewardError(f"reward head {name!r}: step_values raised {one_line(e)}") from e
    expected = [batch.batch_size, batch.response_length]
    if not isinstance(values, Tensor) or list(values.shape) != expected:
        got = list(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise RewardError(
            f"reward head {name!r}: step_values must return a Tensor [B, Tr] = {expected}, "
            f"got {got}"
        )
    values = values.detach().float().cpu()
    at_ends = values[batch.step_end.bool()]
    bad = ~torch.isfinite(at_ends) | (at_ends < 0) | (at_ends > 1)
    if bad.any():
        raise RewardError(
            f"reward head {name!r}: step_values must be probabilities in [0, 1] at step ends, "
            f"got {at_ends[bad][0].item()}"
        )
    return values


def head_step_values(head: RewardHead, batch: HeadBatch) -> tuple[Tensor, Tensor]:
    """(values [B, H] float, step_mask [B, H]): each step's P(still correct after it) by the
    head's `step_values` (see the module docstring)."""
    token_values = _checked_step_values(head, batch)  # [B, Tr]
    return tokens_to_steps(token_values, batch.step_end.cpu())


def predict_first_errors(head: RewardHead, batch: HeadBatch, threshold: float = 0.5) -> list[int]:
    """The head's predicted first wrong step of each of the batch's B solutions (-1: none)."""
    values, step_mask = head_step_values(head, batch)
    counts = step_mask.sum(dim=1).long().tolist()  # [B]
    return [first_error_from_step_values(values[b, :h], threshold) for b, h in enumerate(counts)]


def solution_step_values(
    head: RewardHead,
    rows: Sequence[Row],
    tokenizer: Any,
    *,
    delimiter: str = "\n",
    batch_size: int = 16,
    apply_chat_template: ChatTemplateMode = "auto",
    source: str = "eval data",
    progress: bool = False,
) -> list[list[float]]:
    """Each labelled solution's per-step values (P(still correct) after each of its steps),
    `batch_size` solutions at a time: [N][H_n]."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if not rows:
        raise DataError("no labelled solutions to evaluate")
    per_solution: list[list[float]] = []
    with tqdm(total=len(rows), desc="scoring", unit="solution", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = build_head_batch(
                chunk,
                tokenizer,
                delimiter=delimiter,
                apply_chat_template=apply_chat_template,
                source=source,
                first_index=start,
            )
            with torch.no_grad():
                values, step_mask = head_step_values(head, batch)  # [B, H]
            counts = step_mask.sum(dim=1).long().tolist()  # [B]
            per_solution += [values[b, :h].tolist() for b, h in enumerate(counts)]
            bar.update(len(chunk))
    return per_solution


def score_step_values(
    step_values: Sequence[Sequence[float]], labels: Sequence[int], threshold: float = 0.5
) -> dict[str, Any]:
    """First-error predictions at `threshold` from per-solution step values ([N][H_n]) and
    their scores: {"scores": processbench_scores, "baselines": trivial_baselines,
    "predictions": [N], "labels": [N]}."""
    predictions = [first_error_from_step_values(v, threshold) for v in step_values]
    labels = [int(y) for y in labels]
    return {
        "scores": processbench_scores(predictions, labels),
        "baselines": trivial_baselines(labels),
        "predictions": predictions,
        "labels": labels,
    }


THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(1, 100))
"""Thresholds `best_threshold` tries by default: 0.01, 0.02, ..., 0.99."""


def best_threshold(
    step_values: Sequence[Sequence[float]],
    labels: Sequence[int],
    candidates: Sequence[float] = THRESHOLD_GRID,
) -> tuple[float, float]:
    """(threshold, its F1): the candidate whose first-error predictions from `step_values`
    ([N][H_n]) score the highest F1 against `labels` ([N]); ties go to the earliest candidate.

    A fixed threshold of 0.5 suits a head trained on binary step labels (ProcessBench's
    setting). A value model such as PAV's predicts the base policy's P(success), which sits
    below 0.5 on every step when the policy is weak, so there the fixed cut-off flags step 0
    of every solution. Choose the threshold on a split other than the one scored.
    """
    if not candidates:
        raise ValueError("no candidate thresholds")
    best: tuple[float, float] | None = None
    for threshold in candidates:
        f1 = score_step_values(step_values, labels, threshold)["scores"]["f1"]
        f1 = -1.0 if f1 is None else float(f1)
        if best is None or f1 > best[1]:
            best = (float(threshold), f1)
    assert best is not None
    return best


def evaluate_head(
    head: RewardHead,
    rows: Sequence[Row],
    tokenizer: Any,
    *,
    threshold: float = 0.5,
    delimiter: str = "\n",
    batch_size: int = 16,
    apply_chat_template: ChatTemplateMode = "auto",
    source: str = "eval data",
    progress: bool = False,
) -> dict[str, Any]:
    """Score `head` on labelled solutions at `threshold`, `batch_size` at a time.

    Returns {"scores": processbench_scores, "baselines": trivial_baselines,
    "predictions": [N], "labels": [N]}.
    """
    step_values = solution_step_values(
        head,
        rows,
        tokenizer,
        delimiter=delimiter,
        batch_size=batch_size,
        apply_chat_template=apply_chat_template,
        source=source,
        progress=progress,
    )
    return score_step_values(step_values, [int(r["label"]) for r in rows], threshold)


def format_table(scores: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one line per predictor (the head's `scores`, then the baselines)."""

    def cell(v: Any) -> str:
        return "   n/a" if v is None else f"{v:6.3f}"

    lines = [f"{'predictor':<18} {'acc_error':>9} {'acc_correct':>11} {'F1':>6} {'n':>6}"]
    for name, s in [("head", scores), *baselines.items()]:
        lines.append(
            f"{name:<18} {cell(s['acc_error']):>9} {cell(s['acc_correct']):>11} "
            f"{cell(s['f1']):>6} {s['n']:>6}"
        )
    return "\n".join(lines)
