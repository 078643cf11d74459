"""Observers of the training loop: one callback interface for everything that measures
training without changing it (the credit diagnostics and their gradient share, a user's own
probes), as TRL's callbacks are.

Every hook runs on every rank in the same order, so a hook may use collectives; each returns
the metrics it adds to the row being logged (an empty dict for none). The loop calls:

- `on_credit(trainer, batch, scored, credit)`: after the credit is assigned, before the
  update (the engine still holds the weights that sampled `batch`);
- `on_evaluate(trainer, batch, n_real)`: after an evaluation's greedy rollouts (the first
  `n_real` rows are this rank's real prompts, the rest padding for equal counts);
- `on_log(trainer, row)`: with every finished row (a step's, or step 0's evaluation) before
  rank 0 writes it; returns nothing.

`logging.callbacks` adds the user's by import path (`package.module:ClassName`, constructed
with no arguments; `rl.trainer.loop.build_callbacks` builds the list).
"""

from __future__ import annotations

from typing import Any

from rl.core.types import Credit, RolloutBatch, Scored


class TrainerCallback:
    """Base class: override the hooks you need (every hook's default does nothing)."""

    def on_credit(
        self, trainer: Any, batch: RolloutBatch, scored: Scored, credit: Credit
    ) -> dict[str, Any]:
        return {}

    def on_evaluate(self, trainer: Any, batch: RolloutBatch, n_real: int) -> dict[str, Any]:
        return {}

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        return None
