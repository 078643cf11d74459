"""Reasoning steps of generated responses: token spans from the generated ids.

Offsets come from incremental decodes of the generated ids (decode(ids[:i+1]) against
decode(ids[:i])), not from re-tokenising the text, so the spans describe exactly the tokens
the policy sampled even where a tokenizer would merge the delimiter differently on a second
pass. The token -> step rule is `rl.algos.credit.step_spans_from_offsets`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rl.algos.credit import Span, batch_step_tensors, step_spans_from_offsets
from rl.core.types import HeadBatch, RolloutBatch

CONTEXT_TOKENS = 8
"""Tokens of left context used to decode each token's text in the linear pass (enough for
SentencePiece's leading-space rule and multi-byte characters split over a few tokens)."""


def _offsets_from_decodes(texts: list[str], text: str) -> list[tuple[int, int]]:
    """Per-token spans from `texts[i]` = the decode of the first i tokens (i = 0..n)."""
    offsets: list[tuple[int, int]] = []
    previous_end = 0
    for i in range(len(texts) - 1):
        before, after = texts[i], texts[i + 1]
        common = 0
        limit = min(len(before), len(after))
        while common < limit and before[common] == after[common]:
            common += 1
        start = min(max(common, previous_end), len(text))
        end = min(max(len(after), start), len(text))
        offsets.append((start, end))
        previous_end = end
    return offsets


def _linear_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str] | None:
    """Each token's text, decoded with a short left context: O(n). None where the pieces do
    not concatenate to the full decode (the caller then decodes every prefix)."""
    pieces = []
    for i in range(len(ids)):
        left = list(ids[max(0, i - CONTEXT_TOKENS) : i])
        before = tokenizer.decode(left, skip_special_tokens=True)
        after = tokenizer.decode([*left, ids[i]], skip_special_tokens=True)
        if not after.startswith(before):
            return None
        pieces.append(after[len(before) :])
    return pieces


def decode_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, per-token (char_start, char_end) in text) for generated token ids.

    Each token's text is its decode after a short left context (linear time); when those
    pieces do not add up to the decode of the whole sequence, every prefix is decoded
    instead (quadratic, exact). Special tokens decode to nothing and get an empty span.
    Where a prefix's decode is not a prefix of the next one (a multi-byte character split
    across tokens), the token's span starts where the two decodes diverge, so offsets never
    go backwards.
    """
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    pieces = _linear_pieces(tokenizer, ids)
    if pieces is not None and "".join(pieces) == text:
        offsets, pos = [], 0
        for piece in pieces:
            offsets.append((pos, pos + len(piece)))
            pos += len(piece)
        return text, offsets
    texts = [""] + [
        tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True) for i in range(len(ids))
    ]
    return text, _offsets_from_decodes(texts, text)


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
    rows = ids.tolist()  # one host read for the batch, not one per row
    spans = [
        response_step_spans(tokenizer, rows[row][:n], delimiter) for row, n in enumerate(lengths)
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
        step_id=step_id.to(batch.device),
        step_end=step_end.to(batch.device),
        completions=batch.completions,
        group_size=batch.group_size,
        prompts=batch.prompts,
        columns=batch.columns,
        column_spans=batch.column_spans,
    )
