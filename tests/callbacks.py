"""A user-style loop observer loaded by import path (`logging.callbacks`) in tests."""

from __future__ import annotations

from typing import Any

import torch

from rl.core.types import Credit, RolloutBatch, Scored
from rl.engine import deepspeed_engine as eng
from rl.trainer.callbacks import TrainerCallback


class Probe(TrainerCallback):
    """Counts its calls and the rows it sees over all ranks, and logs them as `probe/*`."""

    def __init__(self) -> None:
        self.credit_calls = 0
        self.logged_rows = 0

    def on_credit(
        self, trainer: Any, batch: RolloutBatch, scored: Scored, credit: Credit
    ) -> dict[str, Any]:
        self.credit_calls += 1
        responses = eng.all_reduce_sum(torch.tensor([float(len(batch))]))
        return {"probe/credit_calls": self.credit_calls, "probe/responses": float(responses[0])}

    def on_evaluate(self, trainer: Any, batch: RolloutBatch, n_real: int) -> dict[str, Any]:
        prompts = eng.all_reduce_sum(torch.tensor([float(n_real)]))
        return {"probe/eval_prompts": float(prompts[0]), "probe/logged_before": self.logged_rows}

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        self.logged_rows += 1


class NotACallback:
    """Has no hooks: `logging.callbacks` refuses it."""
