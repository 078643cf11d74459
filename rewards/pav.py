"""PAV reward heads (Setlur et al. 2024, "Rewarding Progress"): step advantages of a prover.

Both heads compute the base policy's values `Q^pi` after the bare prompt (s_0) and after each
step, turn them into the Best-of-K prover's values `Q^mu = 1 - (1 - Q^pi)^K` and return the
prover's step advantages `A^mu_h = Q^mu(s_h) - Q^mu(s_{h-1})` on each step's last token (the
`pav` credit scheme adds `alpha * A^mu_h` to every token of step h). They differ in where
`Q^pi` comes from:

- `pav` (`PAVHead`): a trained verifier (`rl.engine.value_model.ValueModel`, made by
  `launch/train_pav.py`), `Q^pi = sigmoid(value)` read at the last prompt token and at every
  step-end token. The verifier is frozen (offline PAV, as in the paper). With
  `terminal: outcome` the value after the last step is the response's own outcome instead
  (a finished response's Q^pi is its outcome, which the verifier was trained to predict), so
  a row's step advantages sum to `Q^mu(outcome) - Q^mu(s_0)`: responses the verifier
  overrates (longer ones, truncated ones) cannot raise that sum, though the split of it over
  steps can still be gamed (docs/algorithms.md).
- `pav_mc_oracle` (`PAVMCOracleHead`): fresh Monte-Carlo rollouts of the *current* policy
  from every step prefix, judged by the verifier; after the final step `Q^pi` is the
  response's own outcome. Costly; meant for benchmarks that separate verifier error from
  the method.

Under ZeRO-3 both heads make collective calls: `PAVHead` runs the verifier as a ZeRO-3
inference engine (parameters partitioned like the policy's, gathered layer by layer in each
forward), so every rank must score the same number of rows (the trainer's batches are equal
across ranks); `PAVMCOracleHead` pads every rank's rollouts to the same count when the
rollout backend's generation is collective (transformers `generate` with `synced_gpus`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rewards.heads import REWARD_HEADS, HeadBatch, HeadContext, HeadOutput, RewardHead
from rl.algos.credit import pav_step_advantages_batched, steps_to_tokens, tokens_to_steps
from rl.core.batching import micro_batches
from rl.core.errors import ConfigError
from rl.core.types import position_ids_from_mask
from rl.engine.value_model import check_value_model_dir, load_value_model
from rl.rollout.mc_values import estimate_prefix_values, prefix_texts, q_table, step_prefixes


def pav_output(q_pi: Tensor, step_mask: Tensor, step_end: Tensor, prover_k: int) -> HeadOutput:
    """Head output from a Q^pi table.

    q_pi: [B, H+1] (column 0 the bare prompt, column h after step h), step_mask: [B, H],
    step_end: [B, Tr] -> token_rewards [B, Tr] = A^mu_h on step h's last token, and metrics
    (means over rows with at least one step / over valid steps).
    """
    adv = pav_step_advantages_batched(q_pi, step_mask, prover_k)  # [B, H]
    token_rewards = steps_to_tokens(adv, step_end)  # [B, Tr]
    counts = step_mask.sum(dim=1).long()  # [B]
    has = counts > 0
    rows = torch.arange(q_pi.shape[0], device=q_pi.device)
    q_last = q_pi[rows, counts]  # [B] value after each row's last step
    sums = [has.sum(), q_pi[has, 0].sum(), q_last[has].sum(), adv.sum(), step_mask.sum()]
    n_has, q_prompt, q_last_sum, adv_sum, n_steps = torch.stack(
        [s.double() for s in sums]
    ).tolist()  # one host read
    n_rows = max(1.0, n_has)
    metrics = {
        "q_prompt": q_prompt / n_rows,
        "q_last_step": q_last_sum / n_rows,
        "step_adv": adv_sum / max(1.0, n_steps),
    }
    return HeadOutput(token_rewards=token_rewards, metrics=metrics)


def with_terminal_outcome(q_pi: Tensor, step_mask: Tensor, outcome: Tensor) -> Tensor:
    """q_pi [B, H+1] with each row's value after its last step replaced by its outcome [B]
    (rows without steps unchanged); step_mask [B, H] marks valid steps first."""
    counts = step_mask.sum(dim=1).long()  # [B]
    rows = torch.nonzero(counts > 0).squeeze(1)  # [b]
    anchored = q_pi.clone()
    anchored[rows, counts[rows]] = outcome.to(q_pi.dtype)[rows]
    return anchored


def values_on_step_ends(q_pi: Tensor, step_mask: Tensor, step_end: Tensor) -> Tensor:
    """Q^pi after each step on its last token: q_pi [B, H+1], step_mask [B, H],
    step_end [B, Tr] -> [B, Tr], 0 elsewhere."""
    return steps_to_tokens(q_pi[:, 1:] * step_mask, step_end)


PAVTerminal = Literal["verifier", "outcome"]


def _device_of(module: Any) -> torch.device:
    return next(module.parameters()).device


@dataclass(frozen=True)
class PAVOptions:
    """`reward.heads[i].kwargs` of the `pav` head."""

    path: str
    """The verifier written by `launch/train_pav.py` (HF backbone + `value_head.pt`)."""
    prover_k: int = 4
    """K of the Best-of-K prover: Q^mu = 1 - (1 - Q^pi)^K."""
    terminal: PAVTerminal = "verifier"
    """The value after a response's last step: `verifier` (its prediction, as every other
    step's) or `outcome` (the trainer's outcome verifier on the response; needs a trainer,
    so not in launch/eval_prm.py or launch/search.py)."""


@dataclass(frozen=True)
class PAVMCOracleOptions:
    """`reward.heads[i].kwargs` of the `pav_mc_oracle` head."""

    n_mc: int = 4
    """Monte-Carlo continuations of the current policy from every step prefix."""
    prover_k: int = 4
    """K of the Best-of-K prover."""


@REWARD_HEADS.register("pav")
class PAVHead(RewardHead):
    """Frozen PAV verifier: `A^mu` from `Q^pi = sigmoid(verifier value)` at step ends."""

    name = "pav"
    granularity = "step"
    default_credit = "pav"
    Options = PAVOptions

    def __init__(self, path: str, prover_k: int = 4, terminal: PAVTerminal = "verifier") -> None:
        if prover_k < 1:
            raise ConfigError(f"pav head: prover_k must be >= 1, got {prover_k}")
        if terminal not in ("verifier", "outcome"):
            raise ConfigError(
                f"pav head: terminal must be 'verifier' or 'outcome', got {terminal!r}"
            )
        self.path = str(check_value_model_dir(path))
        self.prover_k = prover_k
        self.terminal = terminal
        self.model: Any = None
        self.outcome_verifier: Any = None
        self.micro_batch_size = 16

    def setup(self, ctx: HeadContext) -> None:
        """Load the verifier on every rank: partitioned as it loads and run by a ZeRO-3
        inference engine under ZeRO-3 (memory like the policy's), else a full frozen copy.
        Its tokenizer must be the policy's."""
        from rl.engine.deepspeed_engine import create_reference

        model, tokenizer = load_value_model(self.path, ctx.dtype, ctx.ds_config)
        if ctx.tokenizer is not None and tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
            raise ConfigError(
                f"pav head: the verifier at {self.path} has another tokenizer than the policy"
            )
        if self.terminal == "outcome" and ctx.verifier is None:
            raise ConfigError(
                "pav head: terminal: outcome needs the trainer's outcome verifier; there is "
                "none here (use terminal: verifier outside launch/train_rl.py)"
            )
        self.model = create_reference(model, ctx.ds_config, offload=ctx.offload_references)
        self.micro_batch_size = ctx.micro_batch_size
        self.outcome_verifier = ctx.verifier

    @torch.no_grad()
    def q_values(self, batch: HeadBatch) -> tuple[Tensor, Tensor]:
        """(q_pi [B, H+1], step_mask [B, H]): the verifier's sigmoid at the last prompt token
        (column 0 of q_pi) and at each step-end token; with `terminal: outcome` the value
        after each row's last step is its outcome."""
        if self.model is None:
            raise RuntimeError("pav head: setup(ctx) was not called")
        device = _device_of(self.model)
        tp = batch.prompt_length
        q_prompt, q_tokens = [], []
        for rows in micro_batches(batch.batch_size, self.micro_batch_size):
            mask = batch.attention_mask[rows]
            logits = self.model(
                input_ids=batch.input_ids[rows].to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids_from_mask(mask).to(device),
            )  # [b, Tp + Tr]
            q = torch.sigmoid(logits.float())  # stays on the device until the loop ends
            q_prompt.append(q[:, tp - 1])  # [b] last prompt token (prompts are left padded)
            q_tokens.append(q[:, tp:])  # [b, Tr]
        q_resp = torch.cat(q_tokens).cpu()  # [B, Tr]
        step_end = batch.step_end.to(q_resp.device)
        q_steps, step_mask = tokens_to_steps(q_resp, step_end)  # [B, H] each
        q_first = torch.cat(q_prompt).cpu().unsqueeze(1)  # [B, 1]
        q_pi = torch.cat([q_first, q_steps], dim=1)  # [B, H+1]
        if self.terminal == "outcome":
            outcome = self.outcome_verifier(batch.prompts, batch.completions, batch.columns)
            q_pi = with_terminal_outcome(q_pi, step_mask, outcome.float().cpu())
        return q_pi, step_mask

    def score(self, batch: HeadBatch) -> HeadOutput:
        q_pi, step_mask = self.q_values(batch)
        return pav_output(q_pi, step_mask, batch.step_end.to(q_pi.device), self.prover_k)

    def step_values(self, batch: HeadBatch) -> Tensor:
        """Q^pi after each step on its last token, 0 elsewhere: [B, Tr]."""
        q_pi, step_mask = self.q_values(batch)
        return values_on_step_ends(q_pi, step_mask, batch.step_end.to(q_pi.device))


def row_prefixes(batch: HeadBatch, tokenizer: Any) -> tuple[list[list[int]], list[str], list[int]]:
    """Every row's rollout prefixes (`rl.pav.data.step_prefixes`) in row order.

    Returns (prefix token lists [N], the prefixes' partial response texts [N], prefixes per
    row [B]). Prompt tokens are read without their left padding, response tokens up to the
    response mask.
    """
    tp = batch.prompt_length
    prefixes: list[list[int]] = []
    texts: list[str] = []
    counts: list[int] = []
    # one host read per tensor for the whole batch, not one per row
    ids, attention = batch.input_ids.tolist(), batch.attention_mask.tolist()
    lengths = batch.response_mask.sum(dim=1).long().tolist()  # [B]
    step_end = batch.step_end.tolist()
    for b in range(batch.batch_size):
        prompt = [t for t, m in zip(ids[b][:tp], attention[b][:tp], strict=True) if m]
        n = lengths[b]
        response = ids[b][tp : tp + n]
        ends = [i for i, end in enumerate(step_end[b][:n]) if end]
        prefixes += step_prefixes(prompt, response, ends)
        texts += prefix_texts(tokenizer, response, ends)
        counts.append(len(ends))
    return prefixes, texts, counts


@REWARD_HEADS.register("pav_mc_oracle")
class PAVMCOracleHead(RewardHead):
    """PAV with Q^pi from fresh Monte-Carlo rollouts of the current policy (no verifier model)."""

    name = "pav_mc_oracle"
    granularity = "step"
    default_credit = "pav"
    Options = PAVMCOracleOptions
    uses_rollout = True

    def __init__(self, n_mc: int = 4, prover_k: int = 4) -> None:
        if n_mc < 1 or prover_k < 1:
            raise ConfigError(
                f"pav_mc_oracle: n_mc and prover_k must be >= 1, got {n_mc}, {prover_k}"
            )
        self.n_mc = n_mc
        self.prover_k = prover_k
        self.ctx: HeadContext | None = None

    def setup(self, ctx: HeadContext) -> None:
        provided = {
            "policy": ctx.policy,
            "rollout": ctx.rollout,
            "verifier": ctx.verifier,
            "sampling": ctx.sampling,
        }
        missing = [k for k, v in provided.items() if v is None]
        if missing:
            raise ConfigError(
                f"pav_mc_oracle needs the trainer's {', '.join(missing)} (it rolls out the "
                "current policy); it cannot run where there is none"
            )
        self.ctx = ctx

    def _pad_to_global_max(
        self,
        batch: HeadBatch,
        prefixes: list[list[int]],
        texts: list[str],
        prompts: list[str],
        columns: dict[str, list[Any]],
    ) -> int:
        """When generation is collective, pad the lists in place to the largest prefix count of
        any rank (copies of this rank's first prefix, or of row 0's bare prompt if it has
        none), so every rank makes the same generate calls. Returns the real prefix count."""
        assert self.ctx is not None
        n = len(prefixes)
        if not self.ctx.rollout.synced_gpus:
            return n
        from rl.engine.deepspeed_engine import all_reduce_max

        extra = int(all_reduce_max(torch.tensor([n]))[0]) - n
        if extra == 0:
            return n
        if n:
            prefix, text, prompt, cols = prefixes[0], texts[0], prompts[0], columns
        else:  # only rows without steps here: roll out row 0's bare prompt instead
            tp = batch.prompt_length
            prefix = batch.input_ids[0, :tp][batch.attention_mask[0, :tp].bool()].tolist()
            text, prompt, cols = "", batch.prompts[0], batch.columns
        prefixes += [prefix] * extra
        texts += [text] * extra
        prompts += [prompt] * extra
        for key, values in columns.items():
            values += [cols[key][0]] * extra
        return n

    def q_values(self, batch: HeadBatch) -> tuple[Tensor, Tensor]:
        """(q_pi [B, H+1], step_mask [B, H]) from rollouts (prefixes) and outcomes (last step)."""
        ctx = self.ctx
        if ctx is None:
            raise RuntimeError("pav_mc_oracle: setup(ctx) was not called")
        prefixes, texts, counts = row_prefixes(batch, ctx.tokenizer)
        owner = [b for b, n in enumerate(counts) for _ in range(n)]
        prompts = [batch.prompts[b] for b in owner]
        columns = {k: [v[b] for b in owner] for k, v in batch.columns.items()}
        n_real = self._pad_to_global_max(batch, prefixes, texts, prompts, columns)
        values = estimate_prefix_values(
            ctx.rollout,
            ctx.policy(),
            prefixes,
            texts,
            prompts,
            columns,
            ctx.verifier,
            ctx.sampling,
            self.n_mc,
        )[:n_real]  # [N]
        outcome = ctx.verifier(batch.prompts, batch.completions, batch.columns)  # [B]
        return q_table(values, counts, outcome)

    def score(self, batch: HeadBatch) -> HeadOutput:
        q_pi, step_mask = self.q_values(batch)
        out = pav_output(q_pi, step_mask, batch.step_end.to(q_pi.device), self.prover_k)
        # the oracle's own samples: n_mc continuations of each prefix s_0..s_{H-1} of a row
        # (its H steps); benchmarks count them next to the policy's rollouts
        n_rows = max(1, step_mask.shape[0])
        out.metrics["mc_rollouts_per_response"] = self.n_mc * float(step_mask.sum()) / n_rows
        return out

    def step_values(self, batch: HeadBatch) -> Tensor:
        """Q^pi after each step on its last token (the outcome after the last), 0 elsewhere."""
        q_pi, step_mask = self.q_values(batch)
        return values_on_step_ends(q_pi, step_mask, batch.step_end.to(q_pi.device))
