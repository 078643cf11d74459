"""The training loop. One step reads top to bottom, one phase per line of `train_step`:

    collect   every rank samples `rollout.group_size` responses for its share of the step's
              `rollout.prompts_per_step` prompts (then a sleep-mode vLLM engine sleeps until
              the sync, or from `logprobs` on when a reward head generates with it);
    score     the reward pipeline: outcome reward functions, then the process reward heads
              (which may also learn online from the outcomes) -> `Scored`;
    logprobs  the trainer's old-policy (and reference) log-probs of the sampled tokens;
    credit    the credit scheme (`algo.credit`: outcome, pav, prime, sum, min_form, gae)
              -> `Credit` (advantages, and value targets under gae), then the off-policy
              correction for vLLM rollouts (mismatch metric, truncated importance sampling);
    update    `algo.epochs` x `algo.mini_batches` optimizer steps of every learner (the policy;
              the critic under gae), losses normalised over the global mini-batch;
    sync      the new weights into the rollout engine.

Between steps, every rank takes the same decisions (rl.trainer.nonfinite, .preemption): a step
whose update met non-finite numbers was skipped on every rank (counted, and the run halts
after `trainer.max_skipped_steps` in a row); a preemption signal on any rank writes a
checkpoint and ends the run with exit 0.

The formulas are in docs/algorithms.md; the maths lives in `rl.algos`.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rewards.base import CallPolicy, RewardSpec
from rewards.build import build_reward_fns, build_reward_heads
from rewards.heads import HeadContext, RewardHead
from rl.algos.credit_specs import CreditSpec
from rl.algos.offpolicy import logprob_mismatch_sums, tis_weights
from rl.config import Config, to_dict
from rl.core.batching import BatchPlan, micro_batches, plan_batches
from rl.core.errors import ConfigError
from rl.core.registry import import_object
from rl.core.types import Credit, LogProbs, RolloutBatch, Scored, column_spans
from rl.data.prompts import PromptSampler, batch_columns, shard
from rl.engine import checkpoint as ckpt
from rl.engine import deepspeed_engine as eng
from rl.engine import watchdog
from rl.engine.forward import padding_counts, response_logprobs
from rl.engine.memory import PhaseMeter
from rl.engine.memory_plan import batch_plan
from rl.engine.models import load_policy, run_dtype
from rl.rollout.backend import SamplingSettings
from rl.setup import (
    check_shared_dir,
    make_rollout,
    max_positions,
    prompt_rows,
    seed_everything,
    training_sampling,
)
from rl.trainer import fault_injection as faults
from rl.trainer.callbacks import TrainerCallback
from rl.trainer.credit import build_credit, resolve_credit
from rl.trainer.critic import Critic
from rl.trainer.diagnostics import CreditDiagnostics
from rl.trainer.learners import CriticLearner, Learner, PolicyLearner, UpdatePlan, run_updates
from rl.trainer.metrics import MetricsLogger, truncate_after
from rl.trainer.nonfinite import (
    SkipTracker,
    final_step_error,
    inputs_verdict,
    local_fault,
    skipped_update_stats,
)
from rl.trainer.preemption import Preemption, resume_line
from rl.trainer.rewards import RewardPipeline, drop_rows
from rl.trainer.run_dir import prepare_output_dir

__all__ = ["BatchPlan", "Trainer", "batch_plan", "build_heads", "plan_batches", "resolve_credit"]


@dataclass
class TrainState:
    """What a checkpoint needs besides model, optimizer and RNG."""

    step: int = 0
    samples: int = 0
    sampler: dict[str, int] = field(default_factory=dict)
    skipped_in_a_row: int = 0


def build_heads(cfg: Config) -> list[tuple[RewardHead, float]]:
    """The run's reward heads with their weights (`reward.heads`), checked at build time."""
    return build_reward_heads(cfg.reward.heads)


def build_callbacks(cfg: Config, tokenizer: Any, credit: CreditSpec) -> list[TrainerCallback]:
    """The run's observers: the credit diagnostics (`logging.credit_diagnostics`), then
    `logging.callbacks` in their order."""
    callbacks: list[TrainerCallback] = []
    if cfg.logging.credit_diagnostics:
        callbacks.append(CreditDiagnostics(cfg, tokenizer, credit))
    for i, spec in enumerate(cfg.logging.callbacks):
        what = f"logging.callbacks.{i}: callback"
        callback = import_object(spec, what, "package.module:ClassName", ConfigError)()
        if not isinstance(callback, TrainerCallback):
            raise ConfigError(
                f"logging.callbacks.{i}: {spec} is not a rl.trainer.callbacks.TrainerCallback"
            )
        callbacks.append(callback)
    return callbacks


def check_lengths(cfg: Config, policy: Any, longest_prompt: int) -> None:
    """ConfigError when the longest kept prompt plus `rollout.max_new_tokens` does not fit
    the model's positions."""
    limit = max_positions(policy)
    if longest_prompt + cfg.rollout.max_new_tokens > limit:
        raise ConfigError(
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} plus the longest kept prompt "
            f"({longest_prompt} tokens) exceeds the model's {limit} positions; lower "
            "rollout.max_new_tokens or data.max_prompt_tokens"
        )


class Trainer:
    """Builds the run from a `Config` and runs it; every rank constructs one."""

    def __init__(self, cfg: Config, dist: eng.DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist
        self.output_dir = Path(cfg.output_dir)
        check_shared_dir(self.output_dir, dist)  # first: rank 0 then decides for every rank
        prepare_output_dir(self.output_dir, cfg.trainer.resume, cfg.trainer.overwrite, dist)
        self.plan = batch_plan(cfg, dist.world_size)
        self.device = eng.accelerator_device()
        """Where batches, log-probs and credit live (the engines' device)."""
        seed_everything(cfg.seed)
        heads = build_heads(cfg)
        self.credit_spec = resolve_credit(cfg, heads)
        ds_config = self._ds_config()
        if cfg.logging.credit_grad_share and self.zero_stage == 3:  # stage set in a JSON file
            raise ConfigError("logging.credit_grad_share: needs deepspeed.zero_stage 0-2, got 3")
        policy, self.tokenizer, model_path = load_policy(cfg, dist, ds_config=ds_config)
        self._load_data(policy)
        self._build_engines(policy, model_path, ds_config)
        functions = build_reward_fns(
            [RewardSpec(f.fn, f.weight, dict(f.kwargs)) for f in cfg.reward.functions]
        )
        self.rewards = RewardPipeline(
            functions,
            heads,
            self.tokenizer,
            cfg.reward.step_delimiter,
            CallPolicy(cfg.reward.timeout_s, cfg.reward.on_error),
        )
        self.credit = build_credit(self.credit_spec, cfg.algo, self.critic)
        self.rollout = make_rollout(cfg, self.tokenizer, model_path, policy, dist, self.zero_stage)
        self.rewards.setup(self._head_context(model_path, ds_config))
        self.callbacks = build_callbacks(cfg, self.tokenizer, self.credit_spec)
        self.state = TrainState()
        self.skips = SkipTracker(cfg.trainer.max_skipped_steps)
        self.preemption = Preemption()
        self.skip_reason = ""
        """Why the last update's optimizer steps were skipped, if they were."""
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.metrics: MetricsLogger | None = None
        # each rank samples differently; reseeded after model building consumed RNG (the
        # ranks of one tensor-parallel vLLM engine send per-request seeds: vllm_backend.py)
        seed_everything(cfg.seed * 1000 + dist.rank)

    # ------------------------------------------------------------------ setup
    def _load_data(self, policy: Any) -> None:
        self.train_rows, skipped_train = prompt_rows(self.cfg, self.tokenizer, "train")
        self.eval_rows, skipped_eval = prompt_rows(self.cfg, self.tokenizer, "eval")
        self.skipped_prompts = skipped_train + skipped_eval
        longest = max((len(r.prompt_ids) for r in self.train_rows + self.eval_rows), default=0)
        check_lengths(self.cfg, policy, longest)
        self.sampler = PromptSampler(len(self.train_rows), self.cfg.seed)

    def _ds_config(self) -> dict[str, Any]:
        cfg = self.cfg
        ds_config = eng.build_ds_config(
            cfg.deepspeed.config,
            zero_stage=cfg.deepspeed.zero_stage,
            micro_batch_size=self.plan.micro_batch_size,
            grad_accum_steps=self.plan.grad_accum_steps,
            world_size=self.dist.world_size,
            max_grad_norm=cfg.optim.max_grad_norm,
            bf16=eng.use_bf16(cfg.model.dtype),
        )
        self.zero_stage = eng.zero_stage_of(ds_config)
        return ds_config

    def _build_engines(self, policy: Any, model_path: str, ds_config: dict[str, Any]) -> None:
        """The policy engine, the frozen reference (with a KL term) and the critic (gae)."""
        cfg = self.cfg
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
            reference, _, _ = load_policy(cfg, self.dist, path=model_path, ds_config=ds_config)
            self.reference = eng.create_reference(
                reference, ds_config, offload=cfg.model.offload_references
            )
        self.critic: Critic | None = None
        if self.credit_spec.needs_critic:
            self.critic = Critic(
                policy_path=model_path,
                ds_config=ds_config,
                path=cfg.critic.path,
                dtype=run_dtype(cfg),
                lr=cfg.critic.lr,
                betas=cfg.optim.betas,
                value_clip=cfg.critic.value_clip,
                micro_batch_size=self.plan.micro_batch_size,
                gradient_checkpointing=cfg.model.gradient_checkpointing,
            )

    def _head_context(self, model_path: str, ds_config: dict[str, Any]) -> HeadContext:
        return HeadContext(
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
            verifier=self.rewards.verifier,
            sampling=self.sampling(),
            dtype=run_dtype(self.cfg),
            offload_references=self.cfg.model.offload_references,
            gradient_checkpointing=self.cfg.model.gradient_checkpointing,
        )

    @property
    def heads(self) -> list[tuple[RewardHead, float]]:
        return self.rewards.heads

    def sampling(self) -> SamplingSettings:
        """Sampling settings of training rollouts."""
        return training_sampling(self.cfg)

    # ------------------------------------------------------------------ phases
    def collect(self) -> RolloutBatch:
        """Rollouts for this rank's share of the step's prompts."""
        indices = shard(
            self.sampler.take(self.cfg.rollout.prompts_per_step),
            self.dist.rank,
            self.dist.world_size,
        )
        rows = [self.train_rows[i] for i in indices]
        batch = self.rollout.rollout(
            self.engine.module,
            [r.prompt_ids for r in rows],
            [r.text for r in rows],
            batch_columns(rows),
            self.sampling(),
            self.cfg.rollout.group_size,
        )
        if self.cfg.rollout.mask_truncated and batch.truncated is not None:
            batch.response_mask = batch.response_mask * (~batch.truncated).unsqueeze(1)
        batch.column_spans = column_spans(batch.attention_mask)  # the forwards' trimming
        return batch.to(self.device)  # the one place rollouts move to the engine's device

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch) -> LogProbs:
        """The trainer's old-policy log-probs `[B, Tr]` of the sampled tokens, the
        reference's (None without KL) and the sampler's (vLLM; else None)."""
        temperature = self.cfg.rollout.temperature
        size = self.cfg.trainer.forward_micro_batch_size or self.plan.micro_batch_size
        need_old = self.needs_old_logprobs()
        old, ref = [], []
        # micro-batches in rollout order, as the update's: with the same rows (and so the
        # same trimmed width) the reference's log-probs match the policy's bit for bit while
        # the two are equal, so the KL is exactly 0 then, also in bf16
        for rows in micro_batches(len(batch), size):
            micro = batch.select(rows)
            if need_old:
                old.append(response_logprobs(self.engine, micro, temperature))
            if self.reference is not None:
                ref.append(response_logprobs(self.reference, micro, temperature))
        return LogProbs(
            torch.cat(old) if old else None,
            torch.cat(ref) if ref else None,
            batch.behaviour_logprobs,
        )

    def needs_old_logprobs(self) -> bool:
        """False when the update is exactly on-policy (`algo.epochs` = `algo.mini_batches` =
        1: the weights that sampled are the ones updated, so the ratio's denominator is the
        update's own log-prob) and nothing else reads them (vLLM's mismatch metric and TIS,
        a KL penalty in the GAE rewards). Then a whole forward pass is saved."""
        cfg = self.cfg
        on_policy = cfg.algo.epochs == 1 and cfg.algo.mini_batches == 1
        kl_in_rewards = self.credit_spec.takes_kl_in_rewards and cfg.algo.kl_mode == "reward"
        return not on_policy or cfg.rollout.backend.reports_logprobs or kl_in_rewards

    def correct_off_policy(self, batch: RolloutBatch, logprobs: LogProbs, credit: Credit) -> Credit:
        """With the sampler's log-probs: log `rollout/logprob_mismatch` and, with
        `rollout.backend.tis_cap`, weight the advantages by truncated importance sampling."""
        if logprobs.behaviour is None:
            return credit
        assert logprobs.old is not None  # vLLM rollouts always get the trainer's
        mask = batch.response_mask
        totals = eng.all_reduce_sum(logprob_mismatch_sums(logprobs.behaviour, logprobs.old, mask))
        credit.stats["rollout/logprob_mismatch"] = float(totals[0]) / max(float(totals[1]), 1.0)
        cap = self.cfg.rollout.backend.importance_cap()
        if cap is not None:
            credit.advantages = credit.advantages * tis_weights(
                logprobs.old, logprobs.behaviour, mask, cap
            )
        return credit

    def policy_frozen(self) -> bool:
        """During the critic's warm-up steps only the critic trains."""
        return self.critic is not None and self.state.step < self.cfg.critic.warmup_steps

    def update(self, batch: RolloutBatch, logprobs: LogProbs, credit: Credit) -> dict[str, float]:
        """Every learner's optimizer steps on the rollouts; returns global stats. Skipped on
        every rank when any rank's inputs hold non-finite numbers."""
        verdict = inputs_verdict(
            local_fault(credit, logprobs, batch.response_mask), self.dist.rank, self.dist.world_size
        )
        if verdict is not None:
            self.skip_reason = verdict
            steps = self.cfg.algo.epochs * self.cfg.algo.mini_batches
            return skipped_update_stats(steps, self.critic is not None)
        self.skip_reason = "non-finite loss or gradient"
        frozen = self.policy_frozen()
        policy = PolicyLearner(
            self.engine,
            self.cfg.algo,
            self.cfg.rollout.temperature,
            engine_old=self.cfg.rollout.backend.engine_old_logprobs(),
            poison_loss=faults.poison_loss(
                self.state.step + 1, self.dist.rank, self.dist.world_size
            ),
        )
        learners: list[Learner] = [] if frozen else [policy]
        if self.critic is not None:
            learners.append(CriticLearner(self.critic, self.cfg.algo.loss_agg, frozen))
        plan = UpdatePlan(
            epochs=self.cfg.algo.epochs,
            mini_batch_seqs=self.plan.mini_batch_seqs,
            micro_batch_size=self.plan.micro_batch_size,
            grad_accum_steps=self.plan.grad_accum_steps,
            world_size=self.dist.world_size,
            shuffle_seed=self.cfg.seed * 7919 + self.state.step,
        )
        return run_updates(learners, [policy] if frozen else [], batch, logprobs, credit, plan)

    def _observe_credit(
        self, batch: RolloutBatch, scored: Scored, credit: Credit
    ) -> dict[str, Any]:
        """The callbacks' metrics of the step's credit (`diag/*` and the user's)."""
        row: dict[str, Any] = {}
        for callback in self.callbacks:
            row.update(callback.on_credit(self, batch, scored, credit))
        return row

    def collect_and_score(self, meter: PhaseMeter) -> tuple[RolloutBatch, Scored]:
        """The rollout and reward phases. A sleep-mode vLLM engine goes to sleep as soon as
        the rollouts are collected, so reward heads (an implicit PRM's update, a verifier's
        forward passes) do not run next to its memory; unless a head generates with it."""
        with meter.phase("rollout"):
            batch = self.collect()
            if not self.rewards.uses_rollout:
                self.rollout.prepare_for_update()
        with meter.phase("reward"):
            self.rewards.at(f"step {self.state.step + 1}, rank {self.dist.rank}")
            scored = self.rewards.score(batch)
            drop_rows(batch, scored.keep)  # rows a head filtered out leave the update
        return batch, scored

    def train_step(self) -> dict[str, Any]:
        watchdog.set_step(self.state.step + 1)
        meter = PhaseMeter()
        start = time.perf_counter()
        batch, scored = self.collect_and_score(meter)
        with meter.phase("logprobs"):
            self.rollout.prepare_for_update()  # no-op when asleep since the rollout phase
            logprobs = self.compute_logprobs(batch)
        with meter.phase("credit"):
            credit = self.credit.assign(batch, scored, logprobs)
            credit = self.correct_off_policy(batch, logprobs, credit)
            diagnostics = self._observe_credit(batch, scored, credit)
        with meter.phase("update"):
            stats = self.update(batch, logprobs, credit)
        with meter.phase("weight_sync"):
            self.rollout.sync_weights(self.engine)
        self.state.step += 1
        self.state.samples += self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size
        row = self._step_row(batch, scored, credit)
        row.update(diagnostics)
        row.update(stats)
        row["time/step_s"] = time.perf_counter() - start
        row.update({f"time/{name}_s": seconds for name, seconds in meter.times.items()})
        if self.heads:
            row["time/heads_s"] = self.rewards.heads_seconds
        row.update(self._memory_row(meter))
        return row

    def _step_row(self, batch: RolloutBatch, scored: Scored, credit: Credit) -> dict[str, Any]:
        """Rewards, response length, head metrics and credit stats, global over ranks."""
        zero = scored.outcome.new_zeros(())
        truncated = batch.truncated.sum() if batch.truncated is not None else zero
        parts = [scored.outcome.sum(), batch.response_mask.sum(), zero + len(batch), truncated]
        parts += [zero + scored.errors]
        parts += [v.sum() for v in scored.per_fn.values()]
        # one stack on the device, one all-reduce, one host read
        sums = eng.all_reduce_sum(torch.stack([p.double() for p in parts])).tolist()
        n, tokens = sums[2], sums[1]
        row: dict[str, Any] = {"step": self.state.step, "samples": self.state.samples}
        row["reward/outcome_mean"] = sums[0] / n
        row["rollout/truncated_frac"] = sums[3] / n
        row["reward/errors"] = sums[4]
        for i, name in enumerate(scored.per_fn):
            row[f"reward/{name}_mean"] = sums[5 + i] / n
        row["train/response_tokens_mean"] = tokens / n
        row.update(scored.metrics)
        if scored.process is not None:
            process = eng.all_reduce_sum(
                torch.tensor([float(scored.process.sum()), float(credit.advantages.abs().sum())])
            )
            row["reward/process_sum_mean"] = float(process[0]) / n
            row["train/advantage_abs_mean"] = float(process[1]) / tokens
        row.update(credit.stats)
        row.update(self._padding_row(batch))
        row["data/skipped_long_prompts"] = self.skipped_prompts
        return row

    def _padding_row(self, batch: RolloutBatch) -> dict[str, float]:
        """Padding share of the update's forward passes (micro-batches in rollout order),
        with the padding columns trimmed (`train/padding_frac`) and as it would be without
        (`train/padding_frac_untrimmed`), over all ranks."""
        counts = padding_counts(
            batch.attention_mask, batch.prompt_length, self.plan.micro_batch_size
        )
        tokens, trimmed, full = eng.all_reduce_sum(torch.tensor(counts, dtype=torch.float64))
        return {
            "train/padding_frac": 1.0 - float(tokens) / max(float(trimmed), 1.0),
            "train/padding_frac_untrimmed": 1.0 - float(tokens) / max(float(full), 1.0),
        }

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
        self.rewards.at(f"evaluation at step {self.state.step}, rank {self.dist.rank}")
        _, per_fn = self.rewards.outcomes(batch)
        first = next(iter(per_fn.values()))[:n_real]
        totals = eng.all_reduce_sum(torch.tensor([float(first.sum()), float(n_real)]))
        row = {"eval/accuracy": float(totals[0] / totals[1])}
        for callback in self.callbacks:
            row.update(callback.on_evaluate(self, batch, n_real))
        return row

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """A complete checkpoint of this step (collective); returns its directory."""
        self.state.sampler = self.sampler.state_dict()
        self.state.skipped_in_a_row = self.skips.in_a_row
        return ckpt.save_checkpoint(
            self.engine,
            self.checkpoint_root,
            self.state.step,
            {
                "step": self.state.step,
                "samples": self.state.samples,
                "sampler": self.state.sampler,
                "skipped_in_a_row": self.state.skipped_in_a_row,
            },
            self.dist.rank,
            self.cfg.trainer.keep_checkpoints,
            save_extra=self._save_extra,
        )

    def _save_extra(self, path: Path) -> None:
        """Heads' and critic's state into the checkpoint dir before it is marked complete."""
        faults.signal_during_save(self.preemption.signal_name is not None)
        for head, _ in self.heads:
            head.save_checkpoint(path / "heads" / head.name)
        if self.critic is not None:
            self.critic.save_checkpoint(path)

    def _resume_path(self) -> Path | None:
        resume = self.cfg.trainer.resume
        if resume == "none":
            return None
        if resume == "auto":  # rank 0 decides, so every rank loads the same checkpoint
            latest = ckpt.latest_checkpoint(self.checkpoint_root) if self.dist.is_main else None
            chosen = eng.broadcast_object(None if latest is None else str(latest))
            return None if chosen is None else Path(chosen)
        return Path(resume)

    def _restore(self) -> None:
        """Resume from a checkpoint when asked and one exists; else start a fresh metrics file
        (a run killed before its first checkpoint leaves rows nothing can continue)."""
        path = self._resume_path()
        metrics_file = self.output_dir / "metrics.jsonl"
        if path is None:
            if self.dist.is_main:
                metrics_file.unlink(missing_ok=True)
            return
        state = ckpt.load_checkpoint(self.engine, path, self.dist.rank)
        self.state = TrainState(
            step=int(state["step"]),
            samples=int(state["samples"]),
            sampler=state["sampler"],
            skipped_in_a_row=int(state.get("skipped_in_a_row", 0)),
        )
        self.skips.in_a_row = self.state.skipped_in_a_row
        self.sampler.load_state_dict(state["sampler"])
        for head, _ in self.heads:
            head.load_checkpoint(path / "heads" / head.name)
        if self.critic is not None:
            self.critic.load_checkpoint(path)
        if self.dist.is_main:
            truncate_after(metrics_file, self.state.step)
            print(f"resumed from {path} at step {self.state.step}", flush=True)

    # ------------------------------------------------------------------ loop
    def sampling_line(self) -> str:
        """What the rollouts really use (the checkpoint's generation defaults never apply)."""
        return (
            f"rollout sampling ({self.cfg.rollout.backend.name}): {self.sampling().describe()}, "
            f"stop ids {self.rollout.eos_ids}; evaluation greedy"
        )

    def should_eval(self, step: int) -> bool:
        every = self.cfg.trainer.eval_every
        return step == self.cfg.trainer.max_steps or (every > 0 and step % every == 0)

    def should_save(self, step: int) -> bool:
        every = self.cfg.trainer.save_every
        return step == self.cfg.trainer.max_steps or (every > 0 and step % every == 0)

    def fit(self) -> None:
        """Run from the current (possibly resumed) step to `trainer.max_steps`, or until a
        preemption signal (then a checkpoint, a resume line, and a normal return)."""
        self.preemption.install()
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
            print(self.sampling_line(), flush=True)
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
                skipped = self._check_skips(row)
                saved = not skipped and self.should_save(self.state.step)
                if saved:
                    self.save()
                faults.simulate_crash_if_asked(self.state.step)
                faults.stop_if_asked(self.state.step, self.dist.rank, self.dist.world_size)
                last = self.state.step == cfg.trainer.max_steps  # then just finish
                if self.preemption.requested() and not last:
                    self._stop_for_preemption(already_saved=saved)
                    return
                if skipped and self.state.step == cfg.trainer.max_steps:
                    raise final_step_error(self.state.step, skipped, self._last_good())
        self._finish()  # a signal now changes nothing: the run is finishing anyway
        self.preemption.uninstall()

    def _check_skips(self, row: dict[str, Any]) -> int:
        """Count the step's skipped optimizer steps, say so, and halt after too many in a row
        (no checkpoint is written at a step with skips: the newest stays a good one)."""
        skipped = self.skips.record(row)
        if skipped and self.dist.is_main:
            tqdm.write(
                f"step {self.state.step}: skipped {skipped} optimizer step(s) "
                f"({self.skip_reason}); {self.skips.in_a_row} in a row "
                f"(trainer.max_skipped_steps={self.skips.limit})"
            )
        if skipped:
            self.skips.check(self.state.step, self._last_good())
        return skipped

    def _last_good(self) -> str:
        """The newest complete checkpoint, for error lines."""
        latest = ckpt.latest_checkpoint(self.checkpoint_root, warn=False)
        return str(latest) if latest is not None else "none written yet"

    def _stop_for_preemption(self, already_saved: bool) -> None:
        """Write this step's checkpoint (unless the schedule just did), close everything,
        print how to resume. The final model is not written: the run is not finished."""
        path = ckpt.checkpoint_dir(self.checkpoint_root, self.state.step)
        if not already_saved:
            path = self.save()
        if self.dist.is_main:
            print(resume_line(self.preemption.signal_name, self.state.step, str(path)), flush=True)
        self._close()

    def _close(self) -> None:
        """Every resource closed (collective)."""
        self.rewards.close()
        if self.metrics is not None:
            self.metrics.close()
        eng.barrier()
        self.rollout.close()

    def _finish(self) -> None:
        """Final models in Hugging Face format, then every resource closed."""
        if self.cfg.trainer.save_final_model:
            eng.save_hf_model(self.engine, self.tokenizer, self.output_dir / "final")
            for head, _ in self.heads:
                head.save_pretrained(self.output_dir / "final_heads" / head.name)
            if self.critic is not None:
                self.critic.save_pretrained(
                    self.output_dir / "final_critic", self.tokenizer, self.dist.is_main
                )
        self._close()

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
        for callback in self.callbacks:
            callback.on_log(self, row)
        if self.metrics is not None:
            self.metrics.log(row)
