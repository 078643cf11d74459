"""Reasoning steps of generated responses: token spans from the generated ids.

Offsets come from incremental decodes of the generated ids (decode(ids[:i+1]) against
decode(ids[:i])), not from re-tokenising the text, so the spans describe exactly the tokens
the policy sampled even where a tokenizer would merge the delimiter differently on a second
pass. The token -> step rule is `rl.credit.step_spans_from_offsets`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rewards.heads import HeadBatch
from rl.credit import Span, batch_step_tensors, step_spans_from_offsets
from rl.types import RolloutBatch


def decode_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, per-token (char_start, char_end) in text) by incremental decoding.

    Special tokens decode to nothing and get an empty span. Where a prefix's decode is not a
    prefix of the next one (a multi-byte character split across tokens), the token's span
    starts where the two decodes diverge, so offsets never go backwards.
    """
    texts = [""]
    for i in range(len(ids)):
        texts.append(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True))
    text = texts[-1]
    offsets: list[tuple[int, int]] = []
    previous_end = 0
    for i in range(len(ids)):
        before, after = texts[i], texts[i + 1]
        common = 0
        limit = min(len(before), len(after))
        while common < limit and before[common] == after[common]:
            common += 1
        start = min(max(common, previous_end), len(text))
        end = min(max(len(after), start), len(text))
        offsets.append((start, end))
        previous_end = end
    return text, offsets


def response_step_spans(
    tokenizer: Any, response_ids: Sequence[int], delimiter: str = "\n"
) -> list[Span]:
    """Inclusive token spans of the steps of one response (its valid tokens only).

    A response without the delimiter is one step; an empty response has none.
    """
    text, offsets = decode_offsets(tokenizer, response_ids)
    return step_spans_from_offsets(text, offsets, delimiter)


def batch_steps(
    tokenizer: Any, batch: RolloutBatch, delimiter: str = "\n"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(step_end [B, Tr] float 0/1, step_id [B, Tr] int64, -1 off the response)."""
    lengths = batch.response_mask.sum(dim=1).long().tolist()  # [B]
    ids = batch.response_ids
    spans = [
        response_step_spans(tokenizer, ids[row, :n].tolist(), delimiter)
        for row, n in enumerate(lengths)
    ]
    return batch_step_tensors(spans, ids.shape[1])


def head_batch(tokenizer: Any, batch: RolloutBatch, delimiter: str = "\n") -> HeadBatch:
    """The `HeadBatch` reward heads score, for this rank's rollouts."""
    step_end, step_id = batch_steps(tokenizer, batch, delimiter)
    return HeadBatch(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        response_mask=batch.response_mask,
        prompt_length=batch.prompt_length,
        step_id=step_id,
        step_end=step_end,
        completions=batch.completions,
        group_size=batch.group_size,
        prompts=batch.prompts,
        columns=batch.columns,
    )
