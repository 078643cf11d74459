"""The implicit PRM as an online reward head (PRIME): its own DeepSpeed engine plus a frozen
reference, token rewards `beta * (log pi_phi - log pi_ref)`, updated every RL step with the
outcome cross-entropy on that step's rollouts (maths in `rl.algos.implicit_prm`).

Registered as `implicit_prm`. Both models start from the SFT policy (`ctx.policy_path`)
unless `path` / `ref_path` say otherwise. With `update="after"` (default) the step's rewards
come from the PRM as it was before seeing the step's outcomes and the update follows; with
`update="before"` the PRM first learns from the step's outcomes and then scores the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rewards.heads import REWARD_HEADS, HeadBatch, HeadContext, HeadOutput, RewardHead
from rl.algos.credit import steps_to_tokens
from rl.algos.implicit_prm import (
    implicit_prm_ce_loss,
    implicit_step_rewards,
    implicit_token_rewards,
    sequence_reward,
)
from rl.algos.losses import engine_loss_scale
from rl.core.batching import micro_batches
from rl.core.errors import ConfigError
from rl.engine import deepspeed_engine as eng
from rl.engine.forward import response_logprobs
from rl.engine.models import enable_gradient_checkpointing


@dataclass(frozen=True)
class ImplicitPRMOptions:
    """`reward.heads[i].kwargs` of the `implicit_prm` head."""

    beta: float = 0.05
    """Scale of the log-ratio: r_t = beta * (log pi_phi - log pi_ref)."""
    lr: float = 1e-6
    """PRM learning rate (AdamW)."""
    update: Literal["after", "before", "never"] = "after"
    """Learn after scoring each step's rollouts, before, or never (an offline PRM)."""
    granularity: Literal["step", "token"] = "step"
    """Step sums on step-end tokens, or every token's reward."""
    path: str | None = None
    """PRM start checkpoint (default: the SFT policy)."""
    ref_path: str | None = None
    """Reference checkpoint (default: the trainer's reference, else the SFT policy)."""


@REWARD_HEADS.register("implicit_prm")
class ImplicitPRMHead(RewardHead):
    """Online implicit PRM (PRIME). kwargs: beta (0.05), lr (PRM learning rate), update
    ("after" | "before" | "never": frozen, an offline PRM), granularity ("step": step sums on
    step-end tokens | "token": every token's reward), path / ref_path (PRM and reference
    start checkpoints; default the SFT policy)."""

    name = "implicit_prm"
    default_credit = "prime"
    Options = ImplicitPRMOptions

    def __init__(
        self,
        beta: float = 0.05,
        lr: float = 1e-6,
        update: Literal["after", "before", "never"] = "after",
        granularity: Literal["step", "token"] = "step",
        path: str | None = None,
        ref_path: str | None = None,
    ) -> None:
        if beta <= 0:
            raise ConfigError(f"implicit_prm: beta must be positive, got {beta}")
        self.beta = beta
        self.lr = lr
        self.update_mode = update
        self.update_first = update == "before"
        self.granularity = granularity
        self.path = path
        self.ref_path = ref_path
        self.engine: Any = None
        self.reference: Any = None
        self.tokenizer: Any = None
        self.micro_batch_size = 1
        self.world_size = 1
        self.grad_accum_steps = 1
        self._ref_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: HeadContext) -> None:
        """Build the PRM engine (one optimizer step per RL step over this rank's B rows)
        and the frozen reference (the trainer's own when both start from the same model)."""
        from transformers import AutoModelForCausalLM

        self.tokenizer = ctx.tokenizer
        self.micro_batch_size = min(ctx.micro_batch_size, ctx.local_batch_size)
        if ctx.local_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"implicit_prm: micro-batch size {self.micro_batch_size} must divide the "
                f"{ctx.local_batch_size} rollouts each rank scores per step"
            )
        self.grad_accum_steps = ctx.local_batch_size // self.micro_batch_size
        self.world_size = ctx.dist.world_size
        ds = dict(ctx.ds_config)
        ds["train_micro_batch_size_per_gpu"] = self.micro_batch_size
        ds["gradient_accumulation_steps"] = self.grad_accum_steps
        ds["train_batch_size"] = self.micro_batch_size * self.grad_accum_steps * self.world_size
        prm_path = self._existing(self.path, "path") or ctx.policy_path
        with eng.zero3_init(ds):
            prm = AutoModelForCausalLM.from_pretrained(prm_path, dtype=ctx.dtype)
        if ctx.gradient_checkpointing:
            enable_gradient_checkpointing(prm)
        self.engine = eng.create_policy_engine(
            prm, ds, lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0
        )
        ref_path = self._existing(self.ref_path, "ref_path")
        if ref_path is None and ctx.reference is not None:
            self.reference = ctx.reference
        else:
            with eng.zero3_init(ds):
                ref = AutoModelForCausalLM.from_pretrained(
                    ref_path or ctx.policy_path, dtype=ctx.dtype
                )
            self.reference = eng.create_reference(ref, ds, offload=ctx.offload_references)

    @staticmethod
    def _existing(path: str | None, key: str) -> str | None:
        if path is not None and not Path(path).exists():
            raise ConfigError(f"implicit_prm: {key} {path} does not exist")
        return path

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _token_rewards(self, batch: HeadBatch) -> torch.Tensor:
        """`beta * (log pi_phi - log pi_ref)` on response tokens: [B, Tr]."""
        prm, ref = [], []
        for index in micro_batches(batch.batch_size, self.micro_batch_size):
            micro = batch.select(index)
            prm.append(response_logprobs(self.engine, micro))
            ref.append(response_logprobs(self.reference, micro))
        ref_logp = torch.cat(ref)
        self._ref_cache = (batch.input_ids, ref_logp)
        return implicit_token_rewards(torch.cat(prm), ref_logp, batch.response_mask, self.beta)

    def score(self, batch: HeadBatch) -> HeadOutput:
        """Step sums of the token rewards on step-end tokens (or the token rewards)."""
        token_r = self._token_rewards(batch)  # [B, Tr]
        r_phi = sequence_reward(token_r, batch.response_mask)  # [B]
        if self.granularity == "token":
            out = token_r
        else:
            steps, _ = implicit_step_rewards(token_r, batch.step_id)  # [B, H]
            out = steps_to_tokens(steps, batch.step_end)  # [B, Tr]
        return HeadOutput(out, {"r_phi": float(r_phi.mean()) if len(r_phi) else 0.0})

    def step_values(self, batch: HeadBatch) -> torch.Tensor:
        """sigma(cumulative implicit reward) at each step-end token [B, Tr]: the PRM's
        probability that the solution is still right after the step (for eval_prm)."""
        token_r = self._token_rewards(batch)
        q = torch.sigmoid(token_r.cumsum(dim=1))
        return q * batch.step_end

    # ------------------------------------------------------------------ online update
    def _ref_logprobs(self, batch: HeadBatch) -> torch.Tensor:
        cached = self._ref_cache
        if cached is not None and cached[0] is batch.input_ids:
            return cached[1]
        with torch.no_grad():
            return torch.cat(
                [
                    response_logprobs(self.reference, batch.select(index))
                    for index in micro_batches(batch.batch_size, self.micro_batch_size)
                ]
            )

    def update(self, batch: HeadBatch, outcome: torch.Tensor) -> dict[str, float]:
        """One optimizer step of the outcome cross-entropy over the global batch."""
        if self.update_mode == "never":
            return {}
        if ((outcome < 0) | (outcome > 1)).any():
            raise ValueError("implicit PRM outcome labels must lie in [0, 1]")
        ref_logp = self._ref_logprobs(batch)  # [B, Tr]
        global_seqs = float(eng.all_reduce_sum(torch.tensor([float(batch.batch_size)]))[0])
        scale = engine_loss_scale(self.world_size, self.grad_accum_steps)
        sums = torch.zeros(2, dtype=torch.float64)  # on the device: one host read per update
        self.engine.train()
        for index in micro_batches(batch.batch_size, self.micro_batch_size):
            micro = batch.select(index)
            rows = torch.tensor(index)
            logp = response_logprobs(self.engine, micro)  # [b, Tr]
            token_r = implicit_token_rewards(logp, ref_logp[rows], micro.response_mask, self.beta)
            # the labels were checked once for the whole batch, above
            loss, stats = implicit_prm_ce_loss(
                token_r, micro.response_mask, outcome[rows].float(), global_seqs, False
            )
            self.engine.backward(loss * scale)
            self.engine.step()
            pair = torch.stack([stats["prm/ce_loss"], stats["prm/acc"]]).detach().double()
            sums = sums.to(pair.device) + pair
        self._ref_cache = None
        ce_loss, acc = eng.all_reduce_sum(sums).tolist()
        return {"ce_loss": ce_loss, "acc": acc}

    # ------------------------------------------------------------------ state
    def save_checkpoint(self, directory: Path) -> None:
        """PRM weights + optimizer (sharded as the engine keeps them); collective."""
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    def load_checkpoint(self, directory: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        if loaded is None:
            raise ConfigError(f"implicit_prm: no PRM checkpoint in {directory}")

    def save_pretrained(self, directory: Path) -> None:
        """The PRM in Hugging Face format (collective; rank 0 writes)."""
        eng.save_hf_model(self.engine, self.tokenizer, directory)
