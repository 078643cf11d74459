"""PPO's critic: a value model (`ValueModel`) trained as its own DeepSpeed engine.

The critic starts from the policy's start model with a fresh, zero-initialised scalar head
(`critic.path` unset) or from a saved value model (`critic.path`), and has its own AdamW
(`critic.lr`; betas and gradient clipping as the policy's). Its DeepSpeed config is the
policy's, so micro-batch size and gradient accumulation match: the trainer runs one critic
micro-step beside each policy micro-step and the critic takes one optimizer step per policy
mini-batch. Its loss is `rl.algos.ppo.clipped_value_loss` in sum form over the global mini-batch
(times `rl.algos.losses.engine_loss_scale`), so the update does not depend on how the batch is
split over ranks or micro-batches.

`V_t` (column t of `values`) is the value of the state *before* response token t: the
model's output at input position `prompt_length - 1 + t`, the position whose logits predict
token t (`response_values`). The value after the last token is 0 (terminal, `rl.algos.ppo.gae`).

Checkpoints: weights, optimizer and scheduler in `<checkpoint>/critic/` (DeepSpeed format,
sharded as the engine keeps them); `save_pretrained` writes a value-model directory that
`critic.path` can start from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rl.algos.losses import AggregationMode
from rl.algos.ppo import clipped_value_loss
from rl.core.batching import micro_batches
from rl.core.errors import ConfigError
from rl.core.types import position_ids_from_mask
from rl.engine import deepspeed_engine as eng
from rl.engine.forward import TokenBatch
from rl.engine.models import enable_gradient_checkpointing
from rl.engine.value_model import load_value_model, save_value_model, value_model_from_policy

CRITIC_DIR = "critic"
"""The critic's subdirectory of a trainer checkpoint."""

CRITIC_STAT_NAMES = {
    "vf_loss": "value_loss",
    "vf_clip_frac": "value_clip_frac",
    "vf_mse": "value_mse",
    "value_mean": "values_mean",
    "return_mean": "returns_mean",
}
"""`clipped_value_loss` stat -> logged name (under `critic/`)."""


def response_values(values: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Per-position values `[B, Tp + Tr]` -> `[B, Tr]`, column t = V of the state before
    response token t (input position `prompt_length - 1 + t`, as logits are read)."""
    if values.ndim != 2 or not 0 < prompt_length < values.shape[1]:
        raise ValueError(
            f"expected values [B, Tp + Tr] with 0 < Tp={prompt_length} < {values.shape[-1]}"
        )
    return values[:, prompt_length - 1 : -1]


def explained_variance(moments: torch.Tensor) -> float:
    """`1 - var(R - V) / var(R)` from global moments `[sum R, sum R^2, sum (R-V), sum (R-V)^2,
    count]` (float64, all-reduced); 0.0 when the returns have (almost) no variance."""
    s_r, ss_r, s_d, ss_d, n = (float(x) for x in moments)
    if n < 2:
        return 0.0
    var_r = ss_r / n - (s_r / n) ** 2
    var_d = ss_d / n - (s_d / n) ** 2
    if var_r <= 1e-12:
        return 0.0
    return 1.0 - var_d / var_r


class Critic:
    """The value model's DeepSpeed engine; every rank constructs one (collective)."""

    def __init__(
        self,
        *,
        policy_path: str,
        ds_config: dict[str, Any],
        path: str | None,
        dtype: torch.dtype,
        lr: float,
        betas: tuple[float, float],
        value_clip: float,
        micro_batch_size: int,
        gradient_checkpointing: bool = False,
    ) -> None:
        if not value_clip >= 0:
            raise ConfigError(f"critic.value_clip must be >= 0 (.inf for none), got {value_clip}")
        if lr <= 0:
            raise ConfigError(f"critic.lr must be positive, got {lr}")
        if path is not None:
            model, _ = load_value_model(path, dtype, ds_config)
            model.train()
        else:
            model = value_model_from_policy(policy_path, dtype, ds_config)
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.value_clip = float(value_clip)
        self.micro_batch_size = micro_batch_size
        self.engine = eng.create_policy_engine(
            model, dict(ds_config), lr=lr, betas=betas, weight_decay=0.0, warmup_steps=0
        )

    def _forward(self, batch: TokenBatch) -> torch.Tensor:
        values = self.engine(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids_from_mask(batch.attention_mask),
        )  # [b, Tp + Tr]
        return response_values(values.float(), batch.prompt_length)  # [b, Tr]

    @torch.no_grad()
    def values(self, batch: Any) -> torch.Tensor:
        """V `[B, Tr]` of every response position under the current critic (no gradient);
        `batch` is a `RolloutBatch` (anything with `select` and the `TokenBatch` fields)."""
        out = []
        for rows in micro_batches(len(batch), self.micro_batch_size):
            out.append(self._forward(batch.select(rows)))
        return torch.cat(out)

    def micro_step(
        self,
        micro: Any,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        *,
        mode: AggregationMode,
        global_tokens: float,
        global_seqs: float,
        scale: float,
    ) -> dict[str, torch.Tensor]:
        """Forward, clipped value loss (sum form over the global mini-batch), backward and
        (at the accumulation boundary) the optimizer step. Returns sum-form stats named as
        logged (`value_loss`, `value_clip_frac`, `value_mse`, `values_mean`, `returns_mean`)."""
        self.engine.train()
        values = self._forward(micro)  # [b, Tr]
        loss, stats = clipped_value_loss(
            values,
            old_values,
            returns,
            micro.response_mask,
            self.value_clip,
            mode,
            global_tokens,
            global_seqs,
        )
        self.engine.backward(loss * scale)
        self.engine.step()
        return {CRITIC_STAT_NAMES[k]: torch.as_tensor(v).detach() for k, v in stats.items()}

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------ state
    def save_checkpoint(self, checkpoint: Path) -> None:
        """Weights, optimizer and scheduler into `<checkpoint>/critic/` (collective)."""
        self.engine.save_checkpoint(str(checkpoint), tag=CRITIC_DIR, save_latest=False)

    def load_checkpoint(self, checkpoint: Path) -> None:
        if not (checkpoint / CRITIC_DIR).is_dir():
            raise ConfigError(f"trainer.resume: {checkpoint} has no critic state ({CRITIC_DIR}/)")
        loaded, _ = self.engine.load_checkpoint(str(checkpoint), tag=CRITIC_DIR)
        if loaded is None:
            raise ConfigError(f"trainer.resume: could not load the critic from {checkpoint}")

    def save_pretrained(self, out_dir: Path, tokenizer: Any, is_main: bool) -> None:
        """The critic as a value-model directory (`critic.path` can start from it);
        collective, rank 0 writes."""
        state = eng.full_state_dict(self.engine)
        if is_main and state is not None:
            save_value_model(self.engine.module, tokenizer, out_dir, state_dict=state)
        eng.barrier()
