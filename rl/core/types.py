"""Rollout batch: what the trainer carries from generation to the policy update.

Shapes: `B` sequences on this rank (= local prompts x group size, grouped contiguously:
rows `p*K .. p*K+K-1` are the K samples of prompt p), `Tp` padded prompt length (left
padding), `Tr` padded response length (right padding after EOS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RolloutBatch:
    """One rank's rollouts for one training step."""

    input_ids: torch.Tensor
    """[B, Tp + Tr] prompt (left-padded) followed by response (right-padded)."""
    attention_mask: torch.Tensor
    """[B, Tp + Tr] 1 on real prompt and response tokens (response up to and incl. EOS)."""
    response_mask: torch.Tensor
    """[B, Tr] float, 1 on response tokens that are trained on."""
    prompt_length: int
    """Tp: responses start at this column of input_ids."""
    prompts: list[str]
    """[B] prompt texts (after the chat template), repeated K times each."""
    completions: list[str]
    """[B] decoded responses (special tokens removed)."""
    columns: dict[str, list[Any]] = field(default_factory=dict)
    """Dataset columns, each a list of length B, for reward functions."""
    group_size: int = 1
    """K: samples per prompt."""
    behaviour_logprobs: torch.Tensor | None = None
    """[B, Tr] the sampling engine's log-probs of the sampled tokens (vLLM), else None."""

    @property
    def response_ids(self) -> torch.Tensor:
        """[B, Tr] response token ids."""
        return self.input_ids[:, self.prompt_length :]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor | list[int]) -> RolloutBatch:
        """Sub-batch of the given rows (tensors only are sliced; text is kept per row)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        picked = index.tolist()
        return RolloutBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            prompt_length=self.prompt_length,
            prompts=[self.prompts[i] for i in picked],
            completions=[self.completions[i] for i in picked],
            columns={k: [v[i] for i in picked] for k, v in self.columns.items()},
            group_size=self.group_size,
            behaviour_logprobs=(
                self.behaviour_logprobs[index] if self.behaviour_logprobs is not None else None
            ),
        )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions counting only attended tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
