"""The training loop: collect -> score -> credit -> update, one short function per phase.

One step: every rank takes its contiguous share of `rollout.prompts_per_step` prompts,
samples `rollout.group_size` responses for each, scores them with the outcome reward
functions and the process reward heads (which may also learn online from the outcomes),
turns the rewards into token advantages (the credit scheme: the outcome estimator alone, or
PRIME / PAV / sum / min-form over the heads' step rewards, or `gae`: PPO with a critic, GAE
over dense token rewards), and runs `algo.epochs` x `algo.mini_batches` optimizer steps of
the clipped surrogate (and, with `gae`, of the critic's clipped value loss). Losses
are token means over the *global* mini-batch (all ranks), so the update does not depend
on how the batch is split across ranks or micro-batches.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rewards.base import RewardSpec, build_reward_fns, score_outcomes
from rewards.heads import HeadBatch, HeadContext, RewardHead, checked_score, resolve_head
from rl.algos.advantages import ADVANTAGE_ESTIMATORS, group_rewards, token_advantages
from rl.algos.credit import CREDIT_ASSIGNERS, CreditInputs, tokens_to_steps
from rl.algos.losses import (
    aggregate_loss,
    engine_loss_scale,
    policy_loss,
    token_entropy,
    token_logprobs,
)
from rl.algos.ppo import dense_token_rewards, gae, last_valid_index, masked_moments, whiten
from rl.config import Config, to_dict
from rl.core.errors import ConfigError, RewardError
from rl.core.types import RolloutBatch
from rl.data.prompts import (
    PromptRow,
    PromptSampler,
    batch_columns,
    load_rows,
    prepare_prompts,
    shard,
)
from rl.engine import checkpoint as ckpt
from rl.engine import deepspeed_engine as eng
from rl.engine.forward import response_logits
from rl.engine.memory import PhaseMeter
from rl.engine.models import load_policy
from rl.rollout.backend import RolloutBackend, SamplingSettings, TransformersRollout
from rl.rollout.steps import head_batch
from rl.trainer.critic import Critic, explained_variance
from rl.trainer.metrics import MetricsLogger, truncate_after

BUILTIN_TRAIN_ROWS = 20000
"""Training rows drawn from a builtin task when `data.train_size` is not set."""


@dataclass
class TrainState:
    """What a checkpoint needs besides model, optimizer and RNG."""

    step: int = 0
    samples: int = 0
    sampler: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchPlan:
    """How one step's rollouts are split on this rank."""

    local_prompts: int
    local_seqs: int
    mini_batch_seqs: int
    micro_batch_size: int
    grad_accum_steps: int


@dataclass
class Scored:
    """One step's rewards on this rank."""

    outcome: torch.Tensor
    """[B] weighted outcome reward (all reward functions)."""
    per_fn: dict[str, torch.Tensor]
    """Each reward function's [B] scores."""
    process: torch.Tensor | None = None
    """[B, Tr] weighted token rewards of the heads (None without heads)."""
    heads: HeadBatch | None = None
    """What the heads scored (step spans included)."""
    token_level: bool = False
    """Some head rewards every token: credit then treats each token as a step."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Head metrics (`head/<name>/<key>`), averaged over ranks."""


def resolve_credit(cfg: Config, heads: list[tuple[RewardHead, float]]) -> str:
    """The credit scheme `algo.credit` names (`auto` resolved); ConfigError when it cannot
    work with the configured heads."""
    credit = cfg.algo.credit
    if credit == "auto":
        credit = str(getattr(heads[0][0], "default_credit", "sum")) if heads else "outcome"
    if cfg.algo.kl_mode == "reward" and credit != "gae":
        raise ConfigError(
            f"algo.kl_mode=reward needs algo.credit=gae (the KL penalty enters GAE's token "
            f"rewards), got algo.credit={credit}; use algo.kl_mode=loss"
        )
    if credit in ("outcome", "gae"):  # gae without heads: outcome reward on the last token
        return credit
    if credit not in CREDIT_ASSIGNERS:
        valid = ", ".join(["outcome", "gae", *CREDIT_ASSIGNERS.names()])
        raise ConfigError(f"algo.credit: unknown credit scheme {credit!r}; valid: auto, {valid}")
    if not heads:
        raise ConfigError(
            f"algo.credit={credit} needs at least one process reward head in reward.heads"
        )
    return credit


def build_heads(cfg: Config) -> list[tuple[RewardHead, float]]:
    """Instantiate `reward.heads`; names must be unique (they key metrics and checkpoints)."""
    heads = [(resolve_head(h.head, dict(h.kwargs)), h.weight) for h in cfg.reward.heads]
    names = [head.name for head, _ in heads]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"reward.heads: two heads are named {dupes[0]!r}; names must be unique")
    return heads


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """Per-rank sizes; ConfigError naming the keys when the numbers do not divide."""
    prompts = cfg.rollout.prompts_per_step
    if prompts % world_size:
        raise ConfigError(
            f"rollout.prompts_per_step={prompts} must be a multiple of the {world_size} ranks"
        )
    local_seqs = prompts // world_size * cfg.rollout.group_size
    if local_seqs % cfg.algo.mini_batches:
        raise ConfigError(
            f"algo.mini_batches={cfg.algo.mini_batches} must divide the {local_seqs} "
            "sequences each rank generates per step"
        )
    mini = local_seqs // cfg.algo.mini_batches
    micro = min(cfg.trainer.micro_batch_size, mini)
    if mini % micro:
        raise ConfigError(
            f"trainer.micro_batch_size={micro} must divide the {mini} sequences per rank "
            "in each mini-batch"
        )
    return BatchPlan(prompts // world_size, local_seqs, mini, micro, mini // micro)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def simulate_crash_if_asked(step: int) -> None:
    """Fault injection for resume tests: `DENSE_RL_KILL_AFTER_STEP=k` SIGKILLs every rank
    right after step k is logged (and saved, if it is a save step), like a machine loss."""
    if os.environ.get("DENSE_RL_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def make_rollout(
    cfg: Config, tokenizer: Any, model_path: str, policy: Any, dist: eng.DistInfo, zero_stage: int
) -> RolloutBackend:
    """The configured generation backend (a vLLM engine is created on every rank at once)."""
    rollout = cfg.rollout
    if rollout.backend == "transformers":
        return TransformersRollout(
            tokenizer, rollout.generation_batch_size, synced_gpus=zero_stage == 3
        )
    from rl.rollout.vllm_backend import VLLMRollout

    max_len = rollout.vllm_max_model_len or min(
        cfg.data.max_prompt_tokens + rollout.max_new_tokens,
        int(getattr(policy.config, "max_position_embeddings", 10**9)),
    )
    return VLLMRollout(
        tokenizer,
        model_path,
        seed=cfg.seed * 1000 + dist.rank,
        max_model_len=max_len,
        tensor_parallel_size=rollout.vllm_tensor_parallel_size,
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        kv_cache_gib=rollout.vllm_kv_cache_gib,
        sleep_mode=rollout.vllm_sleep_mode,
        log=print if dist.is_main else (lambda *_: None),
    )


class Trainer:
    """Builds the run from a `Config` and runs it; every rank constructs one."""

    def __init__(self, cfg: Config, dist: eng.DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist
        self.output_dir = Path(cfg.output_dir)
        self.plan = plan_batches(cfg, dist.world_size)
        seed_everything(cfg.seed)
        self.reward_fns = build_reward_fns(
            [RewardSpec(f.fn, f.weight, dict(f.kwargs)) for f in cfg.reward.functions]
        )
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.algo.advantage)
        self.heads = build_heads(cfg)
        self.credit_scheme = resolve_credit(cfg, self.heads)
        policy, self.tokenizer, model_path = load_policy(cfg, dist)
        self.train_rows, self.eval_rows, self.skipped_prompts = self._load_data()
        self.sampler = PromptSampler(len(self.train_rows), cfg.seed)
        ds_config = eng.build_ds_config(
            cfg.deepspeed.config,
            zero_stage=cfg.deepspeed.zero_stage,
            micro_batch_size=self.plan.micro_batch_size,
            grad_accum_steps=self.plan.grad_accum_steps,
            world_size=dist.world_size,
            max_grad_norm=cfg.optim.max_grad_norm,
            bf16=eng.use_bf16(cfg.model.dtype),
        )
        self.zero_stage = eng.zero_stage_of(ds_config)
        self.engine = eng.create_policy_engine(
            policy,
            ds_config,
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            warmup_steps=cfg.optim.warmup_steps,
        )
        self.reference = None
        if cfg.algo.kl_coef > 0:
            reference, _, _ = load_policy(cfg, dist, path=model_path)
            self.reference = eng.create_reference(reference, ds_config)
        self.critic: Critic | None = None
        if self.credit_scheme == "gae":
            self.critic = Critic(
                policy_path=model_path,
                ds_config=ds_config,
                path=cfg.critic.path,
                lr=cfg.critic.lr,
                betas=cfg.optim.betas,
                value_clip=cfg.critic.value_clip,
                micro_batch_size=self.plan.micro_batch_size,
            )
        self.rollout = make_rollout(cfg, self.tokenizer, model_path, policy, dist, self.zero_stage)
        self._setup_heads(model_path, ds_config)
        self.state = TrainState()
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.metrics: MetricsLogger | None = None
        # each rank samples differently; reseeded after model building consumed RNG
        seed_everything(cfg.seed * 1000 + dist.rank)

    # ------------------------------------------------------------------ setup
    def _setup_heads(self, model_path: str, ds_config: dict[str, Any]) -> None:
        rollout = self.cfg.rollout
        ctx = HeadContext(
            cfg=self.cfg,
            dist=self.dist,
            tokenizer=self.tokenizer,
            policy_path=model_path,
            ds_config=ds_config,
            micro_batch_size=self.plan.micro_batch_size,
            local_batch_size=self.plan.local_seqs,
            reference=self.reference,
            policy=lambda: self.engine.module,
            rollout=self.rollout,
            verifier=self.verifier_scores,
            sampling=SamplingSettings(rollout.max_new_tokens, rollout.temperature, rollout.top_p),
        )
        for head, _ in self.heads:
            setup = getattr(head, "setup", None)
            if setup is not None:
                setup(ctx)

    def verifier_scores(
        self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
    ) -> torch.Tensor:
        """The verifier (first reward function) on any completions: [N] in [0, 1]."""
        _, per_fn = score_outcomes(self.reward_fns[:1], prompts, completions, columns)
        return next(iter(per_fn.values()))

    def _load_data(self) -> tuple[list[PromptRow], list[PromptRow], int]:
        cfg = self.cfg.data
        train_n = cfg.train_size
        if train_n is None and cfg.train.startswith("builtin:"):
            train_n = BUILTIN_TRAIN_ROWS
        prepared = []
        skipped = 0
        for source, split, n in (
            (cfg.train, cfg.train_split, train_n),
            (cfg.eval, cfg.eval_split, cfg.eval_size),
        ):
            rows = load_rows(source, split=split, n=n, seed=self.cfg.seed, task_kwargs=cfg.task)
            kept, dropped = prepare_prompts(
                rows,
                self.tokenizer,
                source=source,
                prompt_column=cfg.prompt_column,
                answer_column=cfg.answer_column,
                max_prompt_tokens=cfg.max_prompt_tokens,
                apply_chat_template=cfg.apply_chat_template,
            )
            prepared.append(kept)
            skipped += dropped
        return prepared[0], prepared[1], skipped

    def _resume_path(self) -> Path | None:
        resume = self.cfg.trainer.resume
        if resume == "none":
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.checkpoint_root)
        return Path(resume)

    def _restore(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        state = ckpt.load_checkpoint(self.engine, path, self.dist.rank)
        self.state = TrainState(
            step=int(state["step"]), samples=int(state["samples"]), sampler=state["sampler"]
        )
        self.sampler.load_state_dict(state["sampler"])
        self._load_heads(path)
        if self.critic is not None:
            self.critic.load_checkpoint(path)
        if self.dist.is_main:
            truncate_after(self.output_dir / "metrics.jsonl", self.state.step)
            print(f"resumed from {path} at step {self.state.step}", flush=True)

    # ------------------------------------------------------------------ phases
    def collect(self) -> RolloutBatch:
        """Rollouts for this rank's share of the step's prompts."""
        indices = shard(
            self.sampler.take(self.cfg.rollout.prompts_per_step),
            self.dist.rank,
            self.dist.world_size,
        )
        rows = [self.train_rows[i] for i in indices]
        sampling = SamplingSettings(
            self.cfg.rollout.max_new_tokens, self.cfg.rollout.temperature, self.cfg.rollout.top_p
        )
        return self.rollout.rollout(
            self.engine.module,
            [r.prompt_ids for r in rows],
            [r.text for r in rows],
            batch_columns(rows),
            sampling,
            self.cfg.rollout.group_size,
        )

    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outcome rewards `[B]` (weighted total) and per-function rewards."""
        total, per_fn = score_outcomes(
            self.reward_fns, batch.prompts, batch.completions, batch.columns
        )
        bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"outcome reward is not finite at batch rows {bad[:8]}")
        return total, per_fn

    def verifier_labels(self, per_fn: dict[str, torch.Tensor]) -> torch.Tensor:
        """The first reward function's scores `[B]`, checked to lie in [0, 1] (online heads
        learn from them as labels)."""
        name, labels = next(iter(per_fn.items()))
        bad = ((labels < 0) | (labels > 1)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(
                f"reward function {name!r} is the verifier (the first in reward.functions) and "
                f"must return values in [0, 1] for online reward heads; batch rows {bad[:8]} "
                "are outside"
            )
        return labels.float()

    def score_heads(self, batch: RolloutBatch, per_fn: dict[str, torch.Tensor]) -> Scored:
        """Run every head (score, and update for online heads, in the head's order), and
        combine their token rewards with the heads' weights."""
        hb = head_batch(self.tokenizer, batch, self.cfg.reward.step_delimiter)
        labels = self.verifier_labels(per_fn)
        combined = torch.zeros_like(batch.response_mask, dtype=torch.float32)  # [B, Tr]
        metrics: dict[str, float] = {}
        token_level = False
        for head, weight in self.heads:
            if getattr(head, "update_first", False):
                metrics.update(self._update_head(head, hb, labels))
            out = checked_score(head, hb)
            combined = combined + weight * out.token_rewards.float()
            token_level = token_level or head.granularity == "token"
            metrics.update({f"head/{head.name}/{k}": v for k, v in out.metrics.items()})
            if not getattr(head, "update_first", False):
                metrics.update(self._update_head(head, hb, labels))
        keys = sorted(metrics)
        reduced = eng.all_reduce_sum(torch.tensor([metrics[k] for k in keys], dtype=torch.float64))
        metrics = {k: float(v) / self.dist.world_size for k, v in zip(keys, reduced, strict=True)}
        return Scored(torch.empty(0), per_fn, combined, hb, token_level, metrics)

    def _update_head(
        self, head: RewardHead, hb: HeadBatch, labels: torch.Tensor
    ) -> dict[str, float]:
        try:
            stats = head.update(hb, labels)
        except Exception as e:
            raise RewardError(f"reward head {head.name!r}: update raised {e!r}") from e
        return {f"head/{head.name}/{k}": float(v) for k, v in (stats or {}).items()}

    def credit(self, batch: RolloutBatch, rewards: torch.Tensor) -> torch.Tensor:
        """Token advantages `[B, Tr]` from group-relative outcome rewards."""
        grouped = group_rewards(rewards, batch.group_size)  # [P, K]
        seq_adv = self.estimator(grouped).reshape(-1)  # [B]
        return token_advantages(seq_adv, batch.response_mask)  # [B, Tr]

    def process_credit(self, batch: RolloutBatch, scored: Scored) -> torch.Tensor:
        """Token advantages `[B, Tr]` from the outcome rewards and the heads' step rewards,
        by the configured credit scheme (groups are whole on each rank)."""
        assert scored.process is not None and scored.heads is not None
        mask = batch.response_mask.float()
        if scored.token_level:  # every response token is its own step
            step_end = mask
            step_id = torch.where(
                mask.bool(), torch.arange(mask.shape[1]).expand_as(mask), torch.tensor(-1)
            )
        else:
            step_end, step_id = scored.heads.step_end, scored.heads.step_id
        step_scores, step_mask = tokens_to_steps(scored.process, step_end)  # [B, H]
        inputs = CreditInputs(
            mask=mask,
            step_id=step_id,
            step_end=step_end,
            outcome=scored.outcome.float(),
            group_size=batch.group_size,
            step_scores=step_scores,
            step_mask=step_mask,
        )
        kwargs = dict(self.cfg.algo.credit_kwargs)
        if self.credit_scheme == "pav":
            kwargs.setdefault("outcome_estimator", self.cfg.algo.advantage)
        try:
            return CREDIT_ASSIGNERS.get(self.credit_scheme)(inputs, **kwargs)
        except TypeError as e:
            raise ConfigError(f"algo.credit_kwargs for {self.credit_scheme!r}: {e}") from e

    @torch.no_grad()
    def gae_credit(
        self,
        batch: RolloutBatch,
        scored: Scored,
        old_logp: torch.Tensor,
        ref_logp: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict[str, float]]:
        """PPO credit: token rewards (outcome on the last token, the heads' process rewards
        on step ends, `- kl_coef * (log pi_old - log pi_ref)` per token with kl_mode=reward),
        the rollout critic's values, GAE advantages (whitened over the global batch) and
        returns. Returns (advantages [B, Tr], (old values, returns) [B, Tr] each, stats)."""
        assert self.critic is not None
        algo = self.cfg.algo
        mask = batch.response_mask
        old_values = self.critic.values(batch)  # [B, Tr]
        kl = None
        kl_coef = 0.0
        if algo.kl_mode == "reward" and ref_logp is not None:
            kl, kl_coef = old_logp - ref_logp, algo.kl_coef  # k1 per token [B, Tr]
        rewards = dense_token_rewards(
            scored.outcome.float(), last_valid_index(mask), scored.process, kl, kl_coef, mask
        )  # [B, Tr]
        advantages, returns = gae(rewards, old_values, mask, algo.gamma, algo.lam)
        m = mask.bool()
        diff = torch.where(m, returns - old_values, torch.zeros(()))  # [B, Tr]
        moments = eng.all_reduce_sum(
            torch.tensor(
                [
                    *masked_moments(advantages, mask),
                    *masked_moments(returns, mask)[:2],
                    *masked_moments(diff, mask)[:2],
                    float((rewards * mask).sum()),
                ],
                dtype=torch.float64,
            )
        )  # [adv sum, adv sum_sq, tokens, R sum, R sum_sq, (R-V) sum, (R-V) sum_sq, r sum]
        n_tok = float(moments[2])
        stats = {
            "critic/explained_variance": explained_variance(moments[[3, 4, 5, 6, 2]]),
            "critic/advantages_mean": float(moments[0]) / max(n_tok, 1.0),
            "reward/token_rewards_mean": float(moments[7]) / max(n_tok, 1.0),
        }
        if algo.whiten_advantages:
            s, ss, n = (float(x) for x in moments[:3])
            advantages = whiten(advantages, mask, global_stats=(s, ss, n))
        return advantages.float(), (old_values, returns.float()), stats

    @torch.no_grad()
    def recompute_logprobs(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trainer's own old-policy log-probs `[B, Tr]` of the sampled tokens, and the
        reference's (None without KL)."""
        temperature = self.cfg.rollout.temperature
        old, ref = [], []
        for rows in chunks(len(batch), self.plan.micro_batch_size):
            micro = batch.select(rows)
            ids = micro.response_ids
            old.append(token_logprobs(response_logits(self.engine, micro, temperature), ids))
            if self.reference is not None:
                logits = response_logits(self.reference, micro, temperature)
                ref.append(token_logprobs(logits, ids))
        return torch.cat(old), (torch.cat(ref) if ref else None)

    def policy_frozen(self) -> bool:
        """During the critic's warm-up steps only the critic trains."""
        return self.critic is not None and self.state.step < self.cfg.critic.warmup_steps

    def update(
        self,
        batch: RolloutBatch,
        advantages: torch.Tensor,
        logprobs: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        value_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """`epochs` x `mini_batches` optimizer steps on the rollouts; returns global stats.

        `logprobs`: (old, reference) log-probs when already computed; `value_targets`:
        (old values, returns) [B, Tr] each: the critic takes a step on every mini-batch too
        (alone while `policy_frozen`)."""
        algo = self.cfg.algo
        old_logp, ref_logp = logprobs if logprobs is not None else self.recompute_logprobs(batch)
        train_policy = not self.policy_frozen()
        critic = self.critic if value_targets is not None else None
        engine_stats: dict[str, float] = {}
        if batch.behaviour_logprobs is not None:
            old_logp, advantages, engine_stats = self.engine_correction(batch, old_logp, advantages)
        scale = engine_loss_scale(self.dist.world_size, self.plan.grad_accum_steps)
        order_gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.state.step)
        sums: dict[str, float] = {}
        grad_norms = []
        critic_norms = []
        n_updates = 0
        for _ in range(algo.epochs):
            order = torch.randperm(len(batch), generator=order_gen) if algo.epochs > 1 else None
            for mb in chunks(len(batch), self.plan.mini_batch_seqs):
                rows = order[mb] if order is not None else torch.tensor(mb)
                mask = batch.response_mask[rows]
                totals = eng.all_reduce_sum(torch.tensor([float(mask.sum()), float(len(rows))]))
                global_tokens, global_seqs = float(totals[0]), float(totals[1])
                for micro_rows in chunks(len(rows), self.plan.micro_batch_size):
                    index = rows[micro_rows]
                    micro = batch.select(index)
                    stats: dict[str, float] = {}
                    if train_policy:
                        policy_stats = self._micro_step(
                            micro,
                            old_logp[index],
                            ref_logp[index] if ref_logp is not None else None,
                            advantages[index],
                            global_tokens,
                            global_seqs,
                            scale,
                        )
                        stats.update({f"train/{k}": v for k, v in policy_stats.items()})
                    if critic is not None and value_targets is not None:
                        critic_stats = critic.micro_step(
                            micro,
                            value_targets[0][index],
                            value_targets[1][index],
                            mode=algo.loss_agg,
                            global_tokens=global_tokens,
                            global_seqs=global_seqs,
                            scale=scale,
                        )
                        stats.update({f"critic/{k}": v for k, v in critic_stats.items()})
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value
                grad_norm = self.engine.get_global_grad_norm() if train_policy else None
                if grad_norm is not None:
                    grad_norms.append(float(grad_norm))
                critic_norm = critic.grad_norm() if critic is not None else None
                if critic_norm is not None:
                    critic_norms.append(critic_norm)
                n_updates += 1
        keys = sorted(sums)
        reduced = eng.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        out = {k: float(v) / n_updates for k, v in zip(keys, reduced, strict=True)}
        out["train/grad_norm"] = sum(grad_norms) / max(1, len(grad_norms))
        out["train/lr"] = float(self.engine.get_lr()[0])
        if critic is not None:
            out["critic/grad_norm"] = sum(critic_norms) / max(1, len(critic_norms))
            out["critic/lr"] = critic.lr()
            out["critic/policy_frozen"] = float(not train_policy)
        out.update(engine_stats)
        return out

    def engine_correction(
        self, batch: RolloutBatch, trainer_logp: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Use the sampler's log-probs: logs the engine/trainer mismatch, and optionally
        takes the engine's log-probs as old-policy log-probs and/or applies truncated
        importance sampling. Returns (old_logp [B, Tr], advantages [B, Tr], stats)."""
        assert batch.behaviour_logprobs is not None
        engine_logp = batch.behaviour_logprobs  # [B, Tr]
        mask = batch.response_mask
        totals = eng.all_reduce_sum(
            torch.tensor(
                [float(((engine_logp - trainer_logp).abs() * mask).sum()), float(mask.sum())],
                dtype=torch.float64,
            )
        )
        stats = {"rollout/logprob_mismatch": float(totals[0] / totals[1])}
        rollout = self.cfg.rollout
        if rollout.tis_cap is not None:
            weight = torch.exp(trainer_logp - engine_logp).clamp(max=rollout.tis_cap)  # [B, Tr]
            advantages = advantages * weight * mask
        old_logp = engine_logp if rollout.old_logprobs == "engine" else trainer_logp
        return old_logp, advantages, stats

    def _micro_step(
        self,
        micro: RolloutBatch,
        old_logp: torch.Tensor,
        ref_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        global_tokens: float,
        global_seqs: float,
        scale: float,
    ) -> dict[str, float]:
        """Forward, loss, backward and (at the accumulation boundary) the optimizer step."""
        algo = self.cfg.algo
        logits = response_logits(self.engine, micro, self.cfg.rollout.temperature)  # [b, Tr, V]
        logp = token_logprobs(logits, micro.response_ids)  # [b, Tr]
        loss, stats = policy_loss(
            logp,
            old_logp,
            ref_logp,
            advantages,
            micro.response_mask,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            kl_coef=algo.kl_coef if algo.kl_mode == "loss" else 0.0,  # else in the rewards
            mode=algo.loss_agg,
            global_tokens=global_tokens,
            global_seqs=global_seqs,
        )
        with torch.no_grad() if algo.entropy_coef == 0 else nullcontext():
            entropy = token_entropy(logits)  # [b, Tr]
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * aggregate_loss(
                entropy, micro.response_mask, algo.loss_agg, global_tokens, global_seqs
            )
        self.engine.backward(loss * scale)
        self.engine.step()
        out = {key: float(value) for key, value in stats.items()}
        out["entropy"] = float((entropy.detach() * micro.response_mask).sum()) / global_tokens
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out split: mean of the first reward function."""
        rows = self.eval_rows
        per_rank = math.ceil(len(rows) / self.dist.world_size)
        mine = rows[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]
        n_real = len(mine)
        # equal counts on every rank keep ZeRO-3's collective generate in step
        mine = mine + [rows[0]] * (per_rank - n_real)
        sampling = SamplingSettings(self.cfg.rollout.max_new_tokens, 1.0, 1.0, greedy=True)
        batch = self.rollout.rollout(
            self.engine.module,
            [r.prompt_ids for r in mine],
            [r.text for r in mine],
            batch_columns(mine),
            sampling,
            group_size=1,
        )
        _, per_fn = self.score(batch)
        first = next(iter(per_fn.values()))[:n_real]
        totals = eng.all_reduce_sum(torch.tensor([float(first.sum()), float(n_real)]))
        return {"eval/accuracy": float(totals[0] / totals[1])}

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, Any]:
        meter = PhaseMeter()
        start = time.perf_counter()
        with meter.phase("rollout"):
            batch = self.collect()
        with meter.phase("reward"):
            rewards, per_fn = self.score(batch)
            scored = Scored(rewards, per_fn)
            if self.heads:
                t_heads = time.perf_counter()
                scored = self.score_heads(batch, per_fn)
                scored.outcome = rewards
                heads_s = time.perf_counter() - t_heads
            logprobs = None
            value_targets = None
            gae_stats: dict[str, float] = {}
            if self.critic is not None:  # old/ref log-probs first: KL-in-reward needs them
                self.rollout.prepare_for_update()
                logprobs = self.recompute_logprobs(batch)
                advantages, value_targets, gae_stats = self.gae_credit(batch, scored, *logprobs)
            elif self.credit_scheme == "outcome":
                advantages = self.credit(batch, rewards)
            else:
                advantages = self.process_credit(batch, scored)
        with meter.phase("update"):
            self.rollout.prepare_for_update()
            stats = self.update(batch, advantages, logprobs, value_targets)
            stats.update(gae_stats)
        with meter.phase("weight_sync"):
            self.rollout.sync_weights(self.engine)
        times = {f"time/{name}_s": seconds for name, seconds in meter.times.items()}
        if self.heads:
            times["time/heads_s"] = heads_s
        memory = self._memory_row(meter)
        self.state.step += 1
        self.state.samples += self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size
        reward_sums = eng.all_reduce_sum(
            torch.tensor(
                [float(rewards.sum()), float(batch.response_mask.sum()), float(len(batch))]
                + [float(v.sum()) for v in per_fn.values()],
                dtype=torch.float64,
            )
        )
        n = float(reward_sums[2])
        row: dict[str, Any] = {"step": self.state.step, "samples": self.state.samples}
        row["reward/outcome_mean"] = float(reward_sums[0]) / n
        for i, name in enumerate(per_fn):
            row[f"reward/{name}_mean"] = float(reward_sums[3 + i]) / n
        row["train/response_tokens_mean"] = float(reward_sums[1]) / n
        row.update(scored.metrics)
        if scored.process is not None:
            process = eng.all_reduce_sum(
                torch.tensor([float(scored.process.sum()), float((advantages.abs()).sum())])
            )
            row["reward/process_sum_mean"] = float(process[0]) / n
            row["train/advantage_abs_mean"] = float(process[1]) / float(reward_sums[1])
        row.update(stats)
        row["data/skipped_long_prompts"] = self.skipped_prompts
        times["time/step_s"] = time.perf_counter() - start
        row.update(times)
        row.update(memory)
        return row

    @staticmethod
    def _memory_row(meter: PhaseMeter) -> dict[str, float]:
        """`mem/<phase>_peak_rss_mb` (and `_peak_gpu_mb` on CUDA), the max over ranks."""
        names = list(meter.peak_rss_mb)
        values = [meter.peak_rss_mb[n] for n in names] + [
            meter.peak_gpu_mb.get(n, 0.0) for n in names
        ]
        peaks = eng.all_reduce_max(torch.tensor(values, dtype=torch.float64)).tolist()
        row = {f"mem/{n}_peak_rss_mb": peaks[i] for i, n in enumerate(names)}
        if meter.peak_gpu_mb:
            row.update({f"mem/{n}_peak_gpu_mb": peaks[len(names) + i] for i, n in enumerate(names)})
        return row

    def should_eval(self, step: int) -> bool:
        every = self.cfg.trainer.eval_every
        return step == self.cfg.trainer.max_steps or (every > 0 and step % every == 0)

    def should_save(self, step: int) -> bool:
        every = self.cfg.trainer.save_every
        return step == self.cfg.trainer.max_steps or (every > 0 and step % every == 0)

    def save(self) -> None:
        self.state.sampler = self.sampler.state_dict()
        ckpt.save_checkpoint(
            self.engine,
            self.checkpoint_root,
            self.state.step,
            {"step": self.state.step, "samples": self.state.samples, "sampler": self.state.sampler},
            self.dist.rank,
            self.cfg.trainer.keep_checkpoints,
            save_extra=self._save_extra,
        )

    def _save_extra(self, path: Path) -> None:
        """Heads' and critic's state into the checkpoint dir before it is marked complete."""
        self._save_heads(path)
        if self.critic is not None:
            self.critic.save_checkpoint(path)

    def _save_heads(self, path: Path) -> None:
        """Every head's state into `<checkpoint>/heads/` (collective)."""
        for head, _ in self.heads:
            save = getattr(head, "save_checkpoint", None)
            if save is not None:
                save(path / "heads" / head.name)
            elif self.dist.is_main:
                (path / "heads").mkdir(exist_ok=True)
                torch.save(head.state_dict(), path / "heads" / f"{head.name}.pt")

    def _load_heads(self, path: Path) -> None:
        for head, _ in self.heads:
            load = getattr(head, "load_checkpoint", None)
            if load is not None:
                load(path / "heads" / head.name)
                continue
            file = path / "heads" / f"{head.name}.pt"
            if not file.is_file():
                raise ConfigError(
                    f"trainer.resume: {path} has no state for reward head {head.name!r}"
                )
            head.load_state_dict(torch.load(file, weights_only=False))

    def fit(self) -> None:
        """Run from the current (possibly resumed) step to `trainer.max_steps`."""
        self._restore()
        self.rollout.sync_weights(self.engine)  # the engine starts from the current weights
        cfg = self.cfg
        if self.dist.is_main:
            self.metrics = MetricsLogger(
                self.output_dir,
                use_wandb=cfg.logging.wandb,
                project=cfg.logging.project,
                run_name=cfg.logging.run_name or self.output_dir.name,
                config=to_dict(cfg),
            )
        if self.state.step == 0:
            self._log(self._eval_row())
        show = self.dist.is_main and cfg.logging.progress_bar
        bar = (
            tqdm(total=cfg.trainer.max_steps, initial=self.state.step, desc="train", unit="step")
            if show
            else None
        )
        with bar if bar is not None else nullcontext():
            while self.state.step < cfg.trainer.max_steps:
                row = self.train_step()
                if self.should_eval(self.state.step):
                    row.update(self._eval_row())
                self._log(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(self._postfix(row))
                if self.should_save(self.state.step):
                    self.save()
                simulate_crash_if_asked(self.state.step)
        if cfg.trainer.save_final_model:
            eng.save_hf_model(self.engine, self.tokenizer, self.output_dir / "final")
            for head, _ in self.heads:
                save_pretrained = getattr(head, "save_pretrained", None)
                if save_pretrained is not None:
                    save_pretrained(self.output_dir / "final_heads" / head.name)
            if self.critic is not None:
                self.critic.save_pretrained(
                    self.output_dir / "final_critic", self.tokenizer, self.dist.is_main
                )
        for head, _ in self.heads:
            close = getattr(head, "close", None)
            if close is not None:
                close()
        if self.metrics is not None:
            self.metrics.close()
        eng.barrier()
        self.rollout.close()

    def _eval_row(self) -> dict[str, Any]:
        t = time.perf_counter()
        row = self.evaluate()
        row["time/eval_s"] = time.perf_counter() - t
        if self.dist.is_main:
            tqdm.write(f"step {self.state.step}: eval/accuracy {row['eval/accuracy']:.4f}")
        if self.state.step == 0:
            row.update({"step": 0, "samples": 0})
        return row

    @staticmethod
    def _postfix(row: dict[str, Any]) -> dict[str, str]:
        out = {"reward": f"{row['reward/outcome_mean']:.3f}"}
        if "eval/accuracy" in row:
            out["eval_acc"] = f"{row['eval/accuracy']:.3f}"
        return out

    def _log(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(row)
