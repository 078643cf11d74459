"""The types that move through a training step: rollouts (`RolloutBatch`, and `HeadBatch`
with step spans), rewards (`Scored`), log-probs (`LogProbs`) and credit (`Credit`).

Shapes: `B` sequences on this rank (= local prompts x group size, grouped contiguously:
rows `p*K .. p*K+K-1` are the K samples of prompt p), `Tp` padded prompt length (left
padding), `Tr` padded response length (right padding after EOS).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    truncated: torch.Tensor | None = None
    """[B] bool: the response reached max_new_tokens without a stop token."""
    column_spans: list[tuple[int, int] | None] | None = None
    """[B] each row's first and last attended column (None: a row with none), read from
    the attention mask once per step (`column_spans`) so that trimming a micro-batch's
    padding needs no host read; None: not read yet."""

    @property
    def response_ids(self) -> torch.Tensor:
        """[B, Tr] response token ids."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def batch_size(self) -> int:
        return int(self.response_mask.shape[0])

    @property
    def response_length(self) -> int:
        return int(self.response_mask.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self: B_, device: torch.device | str) -> B_:
        """The same batch with every tensor field on `device` (texts and columns shared)."""
        changes: dict[str, Any] = {
            f.name: value.to(device)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    def select(self: B_, rows: torch.Tensor | list[int]) -> B_:
        """The same kind of batch holding only `rows`: every per-row tensor, text list and
        dataset column is indexed; per-batch fields (prompt_length, group_size) are kept."""
        index = torch.as_tensor(rows, dtype=torch.long)
        picked = [int(i) for i in rows] if isinstance(rows, list) else index.tolist()
        n = len(self)
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
                changes[f.name] = value[index]
            elif isinstance(value, list) and len(value) == n:
                changes[f.name] = [value[i] for i in picked]
            elif f.name == "columns":
                changes[f.name] = {k: [v[i] for i in picked] for k, v in value.items()}
        return dataclasses.replace(self, **changes)


B_ = TypeVar("B_", bound=RolloutBatch)


@dataclass(kw_only=True)
class HeadBatch(RolloutBatch):
    """Rollouts with their reasoning steps: what reward heads score (`rl.rollout.steps`
    cuts the steps from the generated ids)."""

    step_id: torch.Tensor
    """[B, Tr] int64, each response token's step (0-based), -1 off the response."""
    step_end: torch.Tensor
    """[B, Tr] float 0/1 on each step's last token."""
    prompts: list[str] = field(default_factory=list)
    """[B] prompt texts (after the chat template); may be empty for heads that need none."""


@dataclass
class Scored:
    """One step's rewards on this rank: what the reward pipeline hands to credit."""

    outcome: torch.Tensor
    """[B] weighted outcome reward (all reward functions)."""
    per_fn: dict[str, torch.Tensor]
    """Each reward function's [B] scores (the first is the verifier)."""
    process: torch.Tensor | None = None
    """[B, Tr] weighted token rewards of the heads (None without heads)."""
    step_id: torch.Tensor | None = None
    """[B, Tr] the step of each response token the process rewards refer to (every token
    its own step when a head rewards tokens); None without heads."""
    step_end: torch.Tensor | None = None
    """[B, Tr] 0/1 on the last token of each of those steps; None without heads."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Head metrics (`head/<name>/<key>`), averaged over ranks."""
    keep: torch.Tensor | None = None
    """[B] bool rows every head keeps in the policy update (None: all; see `drop_rows`)."""
    errors: int = 0
    """Rows on this rank whose reward function or head raised or timed out and that got 0
    instead (`reward.on_error=zero`; summed over ranks into `reward/errors`)."""


@dataclass
class LogProbs:
    """Log-probs of the sampled response tokens, all [B, Tr], computed before credit."""

    old: torch.Tensor | None
    """The trainer's policy before this step's update; None when the update is exactly
    on-policy (one epoch, one mini-batch) and nothing else reads them: the update's own
    forward pass then gives them (detached), and the extra pass is skipped."""
    ref: torch.Tensor | None = None
    """The frozen reference (None without a KL term)."""
    behaviour: torch.Tensor | None = None
    """The sampling engine's own (vLLM), else None."""


@dataclass
class Credit:
    """What a credit scheme assigns: the learners' targets."""

    advantages: torch.Tensor
    """[B, Tr] per-token advantages, 0 off the response."""
    values: torch.Tensor | None = None
    """[B, Tr] the critic's values at rollout time (GAE only; the value loss clips to them)."""
    returns: torch.Tensor | None = None
    """[B, Tr] value targets (GAE only)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Global (all-rank) scalars to log."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions counting only attended tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def column_spans(attention_mask: torch.Tensor) -> list[tuple[int, int] | None]:
    """Each row's (first, last) attended column of `attention_mask` `[B, T]`, None for a
    row with no attended column; one host read."""
    attended = attention_mask.bool()  # [B, T]
    columns = torch.arange(attended.shape[1], device=attended.device)
    first = torch.where(attended, columns, attended.shape[1]).amin(dim=1)  # [B]
    last = torch.where(attended, columns, -1).amax(dim=1)  # [B]
    pairs = torch.stack([first, last], dim=1).tolist() if len(attended) else []
    return [(a, b) if b >= 0 else None for a, b in pairs]
