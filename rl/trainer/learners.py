"""Learners and the update loop: `algo.epochs` x `algo.mini_batches` optimizer steps over one
step's rollouts, each learner (the policy; the critic under PPO) taking a micro-step on every
micro-batch.

Losses are sums over the micro-batch divided by the *global* mini-batch's token (or sequence)
count, so the gradient does not depend on how the batch is split over ranks and
micro-batches; `engine_loss_scale` undoes DeepSpeed's own averaging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from rl.algos.losses import (
    aggregate_loss,
    engine_loss_scale,
    policy_loss,
)
from rl.config import AlgoConfig
from rl.core.batching import micro_batches
from rl.core.types import Credit, LogProbs, RolloutBatch
from rl.engine import deepspeed_engine as eng
from rl.engine.forward import response_logprobs_and_entropy
from rl.trainer.critic import Critic


@dataclass(frozen=True)
class GlobalCounts:
    """The global mini-batch a micro-step's loss is normalised by, and DeepSpeed's scale."""

    tokens: float
    seqs: float
    scale: float


class Learner(ABC):
    """One model trained on the rollouts (its own DeepSpeed engine)."""

    prefix: str
    """Metric prefix: `train` for the policy, `critic` for the critic."""

    @abstractmethod
    def micro_step(
        self, micro: RolloutBatch, index: torch.Tensor, logprobs: LogProbs, credit: Credit,
        counts: GlobalCounts,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Forward, loss, backward and (at the accumulation boundary) the optimizer step on
        rows `index` of the step's batch; returns sum-form stats (no prefix) as detached
        0-dim tensors on the device: they are read on the host once per step."""

    @abstractmethod
    def grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm (None if unknown)."""

    @abstractmethod
    def step_applied(self) -> bool:
        """False when the last optimizer step was skipped for non-finite gradients."""

    @abstractmethod
    def step_stats(self) -> dict[str, float]:
        """Stats logged once per step (learning rate ...), with the prefix."""


class PolicyLearner(Learner):
    """The clipped surrogate (+ k3 KL in the loss, + entropy bonus) on the policy engine."""

    prefix = "train"

    def __init__(
        self,
        engine: Any,
        algo: AlgoConfig,
        temperature: float,
        engine_old: bool,
        poison_loss: bool = False,
    ) -> None:
        self.engine = engine
        self.algo = algo
        self.temperature = temperature
        self.engine_old = engine_old
        """Take the sampler's log-probs as the old policy's
        (`rollout.backend.old_logprobs=engine`)."""
        self.poison_loss = poison_loss
        """Fault injection (`rl.trainer.fault_injection`): make every loss on this rank NaN."""

    def micro_step(
        self, micro: RolloutBatch, index: torch.Tensor, logprobs: LogProbs, credit: Credit,
        counts: GlobalCounts,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        # training mode for the forward and backward only: Hugging Face models recompute
        # activations (`model.gradient_checkpointing`) only in training mode, and generate
        # without a KV cache in it, so the policy goes back to eval mode after the step
        self.engine.train()
        try:
            return self._micro_step(micro, index, logprobs, credit, counts)
        finally:
            self.engine.eval()

    def _micro_step(
        self, micro: RolloutBatch, index: torch.Tensor, logprobs: LogProbs, credit: Credit,
        counts: GlobalCounts,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        algo = self.algo
        old = logprobs.behaviour if self.engine_old else logprobs.old
        logp, entropy = response_logprobs_and_entropy(
            self.engine, micro, self.temperature, entropy=True
        )  # [b, Tr] each
        assert entropy is not None
        loss, stats = policy_loss(
            logp,
            logp.detach() if old is None else old[index],  # None: exactly on-policy
            logprobs.ref[index] if logprobs.ref is not None else None,
            credit.advantages[index],
            micro.response_mask,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            kl_coef=algo.kl_coef if algo.kl_mode == "loss" else 0.0,  # else in the rewards
            mode=algo.loss_agg,
            global_tokens=counts.tokens,
            global_seqs=counts.seqs,
            surrogate=algo.policy_loss,
        )
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * aggregate_loss(
                entropy, micro.response_mask, algo.loss_agg, counts.tokens, counts.seqs
            )
        if self.poison_loss:
            loss = loss * float("nan")
            stats["loss"] = loss.detach()
        self.engine.backward(loss * counts.scale)
        self.engine.step()
        out = {key: value.detach() for key, value in stats.items()}
        out["entropy"] = (entropy.detach() * micro.response_mask).sum() / counts.tokens
        return out

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step_applied(self) -> bool:
        return eng.step_applied(self.engine)

    def step_stats(self) -> dict[str, float]:
        return {"train/lr": float(self.engine.get_lr()[0])}


class CriticLearner(Learner):
    """The critic's clipped value loss towards the GAE returns."""

    prefix = "critic"

    def __init__(self, critic: Critic, loss_agg: Any, policy_frozen: bool) -> None:
        self.critic = critic
        self.loss_agg = loss_agg
        self.policy_frozen = policy_frozen

    def micro_step(
        self, micro: RolloutBatch, index: torch.Tensor, logprobs: LogProbs, credit: Credit,
        counts: GlobalCounts,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        assert credit.values is not None and credit.returns is not None
        return self.critic.micro_step(
            micro,
            credit.values[index],
            credit.returns[index],
            mode=self.loss_agg,
            global_tokens=counts.tokens,
            global_seqs=counts.seqs,
            scale=counts.scale,
        )

    def grad_norm(self) -> float | None:
        return self.critic.grad_norm()

    def step_applied(self) -> bool:
        return eng.step_applied(self.critic.engine)

    def step_stats(self) -> dict[str, float]:
        return {"critic/lr": self.critic.lr(), "critic/policy_frozen": float(self.policy_frozen)}


@dataclass(frozen=True)
class UpdatePlan:
    """How the update walks one rank's rollouts."""

    epochs: int
    mini_batch_seqs: int
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    shuffle_seed: int
    """Seeds the per-epoch row order (used when epochs > 1)."""


def run_updates(
    learners: list[Learner],
    frozen: list[Learner],
    batch: RolloutBatch,
    logprobs: LogProbs,
    credit: Credit,
    plan: UpdatePlan,
) -> dict[str, float]:
    """Every epoch and mini-batch: each learner in `learners` takes a micro-step on every
    micro-batch. Returns the stats averaged over optimizer steps and summed over ranks, and
    each learner's (also each frozen one's) mean grad norm, step stats and
    `<prefix>/skipped_steps`: its optimizer steps DeepSpeed skipped for non-finite gradients
    (a NaN loss on one rank makes every rank's reduced gradient NaN, so all ranks skip)."""
    scale = engine_loss_scale(plan.world_size, plan.grad_accum_steps)
    order_gen = torch.Generator().manual_seed(plan.shuffle_seed)
    sums: dict[str, torch.Tensor] = {}  # on the device until the end of the step
    norms: dict[str, list[float]] = {learner.prefix: [] for learner in learners + frozen}
    skipped = {learner.prefix: 0 for learner in learners + frozen}
    n_updates = 0
    for _ in range(plan.epochs):
        order = torch.randperm(len(batch), generator=order_gen) if plan.epochs > 1 else None
        for mb in micro_batches(len(batch), plan.mini_batch_seqs):
            rows = order[mb] if order is not None else torch.tensor(mb)
            totals = eng.all_reduce_sum(
                torch.tensor([float(batch.response_mask[rows].sum()), float(len(rows))])
            )
            # at least 1 token: with rollout.mask_truncated a mini-batch may have none left
            counts = GlobalCounts(max(float(totals[0]), 1.0), float(totals[1]), scale)
            for micro_rows in micro_batches(len(rows), plan.micro_batch_size):
                index = rows[micro_rows]
                micro = batch.select(index)
                for learner in learners:
                    stats = learner.micro_step(micro, index, logprobs, credit, counts)
                    for key, value in stats.items():
                        name = f"{learner.prefix}/{key}"
                        value = value.double()
                        sums[name] = sums[name] + value if name in sums else value
            for learner in learners:
                norm = learner.grad_norm()
                if norm is not None:
                    norms[learner.prefix].append(norm)
                skipped[learner.prefix] += not learner.step_applied()
            n_updates += 1
    keys = sorted(sums)
    stacked = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0)
    reduced = eng.all_reduce_sum(stacked).tolist()  # the step's one host read of the stats
    out = {k: v / n_updates for k, v in zip(keys, reduced, strict=True)}
    for learner in learners + frozen:
        values = norms[learner.prefix]
        out[f"{learner.prefix}/grad_norm"] = sum(values) / max(1, len(values))
        out[f"{learner.prefix}/skipped_steps"] = float(skipped[learner.prefix])
        out.update(learner.step_stats())
    return out
