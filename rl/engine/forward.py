"""Forward passes over (prompt + response) batches shared by the policy, reference, PRM
and critic: logits and log-probs of the response tokens.

Any batch object with `input_ids [B, Tp + Tr]`, `attention_mask [B, Tp + Tr]` and
`prompt_length` (Tp) works: `rl.core.types.RolloutBatch` and `rewards.heads.HeadBatch` both do.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from rl.algos.losses import token_logprobs
from rl.core.types import position_ids_from_mask


class TokenBatch(Protocol):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int


def response_logits(model: Any, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits `[b, Tr, V]` (divided by the sampling temperature) predicting the responses."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
        use_cache=False,
    ).logits  # [b, Tp + Tr, V]
    return logits[:, batch.prompt_length - 1 : -1].float() / temperature  # [b, Tr, V]


def response_logprobs(model: Any, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs `[b, Tr]` of the response tokens under `model` (gradient kept if enabled)."""
    ids = batch.input_ids[:, batch.prompt_length :]  # [b, Tr]
    return token_logprobs(response_logits(model, batch, temperature), ids)
