"""Monte-Carlo values of step prefixes (Math-Shepherd-style rollouts), shared by PAV's
verifier data (`rl.pav.data`) and the MC-oracle head (`rewards.pav`).

For a prompt x and a solution y cut into steps 1..H, the step prefixes are the bare prompt
(s_0) and the prompt followed by y up to the end of each step h < H; `Q^pi` of a prefix is the
share of `n_mc` continuations sampled from pi after it that the verifier accepts; after the
final step the label is the solution's own outcome (no rollouts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rl.rollout.backend import RolloutBackend, SamplingSettings

Verifier = Callable[[list[str], list[str], dict[str, list[Any]]], Tensor]
"""`fn(prompts [N], completions [N], columns {name: [N]}) -> outcome [N]` in [0, 1]."""


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
    success = continuation_outcomes(
        rollout, model, prefixes, texts, prompts, columns, verifier, sampling, n_mc
    )  # [N, n_mc]
    return success_rates(success.reshape(-1), n_mc)  # [N]


def continuation_outcomes(
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
    """The verifier's outcome of each of `n_mc` continuations of N prefixes -> [N, n_mc]
    (arguments as `estimate_prefix_values`, which averages them)."""
    if not prefixes:
        return torch.zeros(0, n_mc)
    out = rollout.rollout(model, prefixes, prompts, columns, sampling, group_size=n_mc)
    completions = [texts[i // n_mc] + c for i, c in enumerate(out.completions)]
    success = verifier(out.prompts, completions, out.columns)  # [N * n_mc]
    return success.float().reshape(len(prefixes), n_mc)  # [N, n_mc]
