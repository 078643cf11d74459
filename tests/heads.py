"""Test-only reward heads: exact oracles of the built-in arithmetic task.

They check each step with the task's own `first_error_step`, so a perfect PRM run through
`rl.eval.prm` must score F1 = 1.0 on the built-in labels: an end-to-end check of the
labelling, the step mapping and the scores. Not a project feature (they need the task's
ground truth); resolve them as `tests.heads:ArithOraclePRM` / `tests.heads:ArithOracleRewardPRM`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rewards.heads import Granularity, HeadBatch, HeadOutput, StatelessHead
from rl.tasks import arith


class ArithOraclePRM(StatelessHead):
    """Step values: 1 on every token of a step before the first wrong one, 0 from it on.

    Reads the problem from `columns["prompt"]` (the raw prompt, as dataset columns carry it)
    and each token's step from `batch.step_id`, so the values land where the eval reads them
    only if the step mapping is right.
    """

    granularity: Granularity = "step"

    def __init__(self, modulus: int = arith.DEFAULT_MODULUS, name: str = "arith_oracle_prm"):
        self.name = name
        self.modulus = modulus
        self.tokenizer: Any = None
        self.setup_calls = 0

    def setup(self, ctx: Any) -> None:
        """With the tokenizer, steps are checked on their own tokens (see `first_errors`)."""
        self.setup_calls += 1
        self.tokenizer = ctx.tokenizer

    def first_errors(self, batch: HeadBatch) -> Tensor:
        """[B] first wrong step of each response, -1 if none: after `setup`, by decoding each
        step's tokens (`batch.step_id`) and comparing with `arith.step_lines`, so a wrong
        token -> step mapping shows as wrong predictions; else from the completion text."""
        prompts = batch.columns["prompt"]
        if self.tokenizer is None:
            first = [
                arith.first_error_step(p, c, self.modulus)
                for p, c in zip(prompts, batch.completions, strict=True)
            ]
        else:
            responses = batch.input_ids[:, batch.prompt_length :]  # [B, Tr]
            first = [
                self._first_error_of_tokens(p, responses[b], batch.step_id[b])
                for b, p in enumerate(prompts)
            ]
        return torch.tensor(first)

    def _first_error_of_tokens(self, prompt: str, ids: Tensor, step_id: Tensor) -> int:
        """ids, step_id: [Tr] of one response."""
        expected = arith.step_lines(arith.parse_prompt(prompt, self.modulus))
        n = int(step_id.max().item()) + 1
        for h in range(n):
            text = self.tokenizer.decode(ids[step_id == h].tolist(), skip_special_tokens=True)
            if h >= len(expected) or text.strip() != expected[h]:
                return h
        return n if n < len(expected) else -1

    def step_values(self, batch: HeadBatch) -> Tensor:
        """[B, Tr] P(still correct after this token's step): 1 or 0; 0 off the response."""
        first = self.first_errors(batch).unsqueeze(1)  # [B, 1]
        on = batch.step_id >= 0
        ok = (first < 0) | (batch.step_id < first)
        return (on & ok).float()

    def score(self, batch: HeadBatch) -> HeadOutput:
        """Progress rewards (the change of the step value): -1 on the first wrong step's end."""
        first = self.first_errors(batch).unsqueeze(1)  # [B, 1]
        at_error = batch.step_end.bool() & (batch.step_id == first)
        return HeadOutput(token_rewards=-at_error.float())


class ArithOracleRewardPRM(StatelessHead):
    """The same oracle as implicit-PRM-style log-odds rewards (no `step_values`): +`margin` on
    the first step's end, -2 * `margin` on the first wrong step's end, so the cumulative sum
    is +margin while right and -margin from the first error on."""

    granularity: Granularity = "step"

    def __init__(self, margin: float = 4.0, modulus: int = arith.DEFAULT_MODULUS) -> None:
        self.name = "arith_oracle_reward_prm"
        self.margin = margin
        self.oracle = ArithOraclePRM(modulus)

    def score(self, batch: HeadBatch) -> HeadOutput:
        first = self.oracle.first_errors(batch).unsqueeze(1)  # [B, 1]
        ends = batch.step_end.bool()
        r = torch.zeros(batch.step_end.shape)
        r[ends & (batch.step_id == 0)] += self.margin
        r[ends & (batch.step_id == first)] -= 2 * self.margin
        return HeadOutput(token_rewards=r)
