"""Policy-gradient losses: clipped surrogate, k3 KL, per-token log-probs/entropy, aggregation.

Pure tensor maths (imports torch only). Shapes: B sequences in a micro-batch, T token
positions, V vocabulary; `mask: [B, T]` is 1 on response tokens that count in the loss.

What is implemented:
- `POLICY_LOSSES`: the per-token surrogate losses by name (`algo.policy_loss`), one
  signature `fn(logp, old_logp, advantages, clip_low, clip_high) -> (loss, clipped)`, as
  advantage estimators and credit schemes are registered; `policy_loss` looks it up.
- `clipped_surrogate` (`ppo_clip`): PPO/GRPO per-token loss
  `-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)` with asymmetric clip ranges (DAPO's
  "clip-higher"); no dual clip. The log-ratio is clamped to [-LOG_RATIO_CLAMP,
  LOG_RATIO_CLAMP] before `exp` (`safe_ratio`): a log-ratio of 89 or more (an engine
  log-prob of -inf, a corrupted row) overflows float32 to an infinite loss and a NaN
  gradient for the whole step; ratios that large are clipped anyway, and values with
  |log-ratio| <= 20 are unchanged.
- `k3_kl`: the k3 estimator `exp(l_ref - l) - (l_ref - l) - 1` (Schulman), used as a loss term
  `kl_coef * aggregate(k3)` (GRPO style), aggregated exactly like the surrogate.
- `aggregate_loss`: *sum-form* aggregation. Each micro-batch returns its share of the
  global-batch mean (divided by the global token or sequence count, not its own), so summing
  over every micro-batch on every rank gives exactly the global mean, however the batch was
  split. `engine_loss_scale` undoes DeepSpeed's own averaging (see there).
  Modes: "token_mean" (every response token in the global batch weighs the same, DAPO-style)
  and "seq_mean" (per-sequence token mean, then mean over sequences: the original GRPO
  objective). Dr.GRPO's constant length normaliser is "token_mean" with
  `global_tokens = global_seqs * max_new_tokens`.
- `token_logprobs`, `token_entropy`: written here (a row-at-a-time log_softmax) rather than
  imported from `trl.trainer.utils`, because importing that module pulls in transformers
  (~3000 modules, ~6 s), which would make this module impure. Same maths as TRL's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from rl.core.errors import ConfigError
from rl.core.registry import Registry

LOG_RATIO_CLAMP = 20.0
"""|log pi - log pi_old| (and |log pi_ref - log pi| in k3) is clamped to this before exp:
exp(20) = 4.9e8 is finite in bf16, fp16 and fp32, and far beyond any clip range."""

AggregationMode = Literal["token_mean", "seq_mean"]
AGGREGATION_MODES: tuple[str, ...] = ("token_mean", "seq_mean")


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[ids], computed one sequence at a time to bound memory.

    logits: [B, T, V], ids: [B, T] (int64) -> [B, T] float32 (float64 if logits are float64).
    Each row is upcast to at least float32 before the log_softmax (bf16 logsumexp is lossy).
    The caller aligns logits and ids (logits at position t predict ids at position t).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    out = []
    for row_logits, row_ids in zip(logits, ids, strict=True):  # [T, V], [T]
        row = row_logits.to(torch.promote_types(row_logits.dtype, torch.float32))
        if temperature != 1.0:
            row = row / temperature
        logp = row.log_softmax(dim=-1)  # [T, V]
        out.append(logp.gather(dim=-1, index=row_ids.unsqueeze(-1)).squeeze(-1))  # [T]
    return torch.stack(out)  # [B, T]


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) at each position, one sequence at a time.

    logits: [B, T, V] -> [B, T] (float32, or float64 for float64 logits).
    """
    out = []
    for row_logits in logits:  # [T, V]
        logp = row_logits.to(torch.promote_types(row_logits.dtype, torch.float32))
        logp = logp.log_softmax(dim=-1)  # [T, V]
        out.append(-(logp.exp() * logp).sum(dim=-1))  # [T]
    return torch.stack(out)  # [B, T]


def logprobs_and_entropy(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Sampled-token log-probs and entropy of `softmax(logits / temperature)` for one chunk.

    logits: [b, c, V] (any float dtype; upcast to float32 here, chunk by chunk), ids: [b, c]
    -> (log-probs [b, c], entropy [b, c] or None), float32. The same numbers as
    `token_logprobs` / `token_entropy`, via one logsumexp: `log p_y = z_y - lse(z)` and
    `H = lse(z) - sum_v p_v z_v`.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [b, c, V]
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # [b, c]
    logp = z.gather(dim=-1, index=ids.unsqueeze(-1)).squeeze(-1) - lse  # [b, c]
    if not entropy:
        return logp, None
    probs = (z - lse.unsqueeze(-1)).exp()  # [b, c, V]
    return logp, lse - (probs * z).sum(dim=-1)


def safe_ratio(log_ratio: Tensor) -> Tensor:
    """`exp(clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))`: [B, T] -> [B, T].

    Equal to `exp(log_ratio)` where |log_ratio| <= LOG_RATIO_CLAMP (and the gradient too);
    finite for +-inf inputs, whose gradient is 0. NaN stays NaN (it is a fault to be seen).
    """
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T]


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO/GRPO clipped surrogate loss and where clipping was active.

    logp: [B, T] log pi(y_t) under the current policy (carries the gradient);
    old_logp: [B, T] under the policy that sampled the tokens (treated as a constant);
    advantages: [B, T]. Returns (loss [B, T], clipped [B, T] float 0/1) with
    `rho = safe_ratio(logp - old_logp)` (exp of the log-ratio clamped to +-20),
    `loss = -min(rho A, clip(rho, 1-clip_low, 1+clip_high) A)`;
    `clipped` is 1 where the clipped term is the smaller one and differs from the unclipped
    one (A > 0 and rho > 1+clip_high, or A < 0 and rho < 1-clip_low), i.e. where the token
    gets no gradient. Unmasked: aggregate with `aggregate_loss`.
    """
    ratio = safe_ratio(logp - old_logp.detach())  # [B, T]
    unclipped = ratio * advantages  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages  # [B, T]
    loss = -torch.minimum(unclipped, clipped)  # [B, T]
    was_clipped = (clipped < unclipped).to(logp.dtype)  # [B, T]
    return loss, was_clipped


SurrogateLoss = Callable[[Tensor, Tensor, Tensor, float, float], tuple[Tensor, Tensor]]
"""`fn(logp, old_logp, advantages, clip_low, clip_high) -> (loss [B, T], clipped [B, T])`:
per-token loss (unmasked) and the 0/1 indicator of tokens whose gradient a clip removed."""

POLICY_LOSSES: Registry[SurrogateLoss] = Registry("policy loss")
POLICY_LOSSES.register("ppo_clip")(clipped_surrogate)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: `exp(ref - logp) - (ref - logp) - 1` >= 0.

    logp: [B, T] (carries the gradient), ref_logp: [B, T] (a constant) -> [B, T]. The
    difference is clamped to +-LOG_RATIO_CLAMP first (unchanged within it), as in the ratio.
    """
    d = (ref_logp.detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    return torch.exp(d) - d - 1.0  # [B, T]


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of `x` over positions where `mask` is set (NaN/inf at masked-out positions ignored).

    x: [B, T], mask: [B, T] (any dtype, nonzero = counted) -> scalar.
    """
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def aggregate_loss(
    loss_tok: Tensor,
    mask: Tensor,
    mode: AggregationMode,
    global_tokens: float,
    global_seqs: float,
) -> Tensor:
    """This micro-batch's share of the global-batch mean of `loss_tok` (sum form).

    loss_tok: [b, T], mask: [b, T] for a micro-batch (b of the global batch's sequences).
    global_tokens: number of masked-in tokens in the whole global batch (all micro-batches on
    all ranks); global_seqs: number of sequences in it.
    - "token_mean": `sum(loss * mask) / global_tokens`;
    - "seq_mean": `sum_i (sum_t loss_it mask_it / sum_t mask_it) / global_seqs` (a sequence
      with no masked-in token contributes 0 but still counts in `global_seqs` if the caller
      counted it).
    Summing the result over all micro-batches of all ranks gives the global-batch mean, so
    the gradient does not depend on how the batch was split. Returns a scalar.
    """
    if mode == "token_mean":
        if global_tokens <= 0:
            raise ValueError(f"global_tokens must be positive, got {global_tokens}")
        return masked_sum(loss_tok, mask) / global_tokens
    if mode == "seq_mean":
        if global_seqs <= 0:
            raise ValueError(f"global_seqs must be positive, got {global_seqs}")
        m = mask.bool()
        zero = torch.zeros((), dtype=loss_tok.dtype, device=loss_tok.device)
        seq_sum = torch.where(m, loss_tok, zero).sum(dim=1)  # [b]
        seq_len = m.sum(dim=1).clamp(min=1).to(loss_tok.dtype)  # [b]
        return (seq_sum / seq_len).sum() / global_seqs
    raise ConfigError(
        f"unknown loss aggregation mode {mode!r}; valid: {', '.join(AGGREGATION_MODES)}"
    )


def engine_loss_scale(world_size: int, grad_accum_steps: int) -> float:
    """Factor to multiply a sum-form micro-batch loss by before `engine.backward(loss)`.

    DeepSpeed's `engine.backward` divides each micro-batch loss by
    `gradient_accumulation_steps` (`scale_wrt_gas=True`, the default), and ZeRO averages the
    accumulated gradients over the data-parallel ranks (divides the all-reduced sum by
    world_size). Our `aggregate_loss` values already *sum* to the global mean over all
    micro-batches of all ranks, so the trainer multiplies each by
    `world_size * grad_accum_steps` to cancel both divisions; the resulting gradient is exactly
    the gradient of the global-batch mean. `grad_accum_steps` must equal the number of
    micro-batches each rank runs per optimizer step (as DeepSpeed is configured), and
    `world_size` is the data-parallel world size.
    """
    if world_size < 1 or grad_accum_steps < 1:
        raise ValueError(
            f"world_size and grad_accum_steps must be >= 1, got {world_size}, {grad_accum_steps}"
        )
    return float(world_size * grad_accum_steps)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    mode: AggregationMode,
    global_tokens: float,
    global_seqs: float,
    stats_tokens: float | None = None,
    surrogate: str = "ppo_clip",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum-form micro-batch loss `surrogate + kl_coef * k3`, both aggregated by `mode`.

    logp, old_logp, ref_logp (or None for no KL term; then kl_coef must be 0), advantages,
    mask: [b, T]. `global_tokens`, `global_seqs`: see `aggregate_loss`. `stats_tokens`: the
    true global count of masked-in tokens, used for the token-mean stats; defaults to
    `global_tokens` (pass it when `global_tokens` is a constant normaliser, as for Dr.GRPO).
    `surrogate`: the per-token loss by its name in `POLICY_LOSSES` (default `ppo_clip`).

    Returns (loss scalar, stats). Multiply loss by `engine_loss_scale` before backward.
    Stats are detached SUM-form contributions: all-reduce-SUM them over every micro-batch of
    every rank to get the global value.
    - "loss", "pg_loss", "kl_loss": total, surrogate and k3 terms aggregated by `mode`
      (kl_loss is before `kl_coef`);
    - "clip_frac", "ratio", "kl": global token means of the clipped indicator, rho and k3.

    Positions outside `mask` are neutralised before exp (logp := old_logp, ref := logp there)
    so padding garbage cannot produce inf/NaN values or gradients.
    """
    if ref_logp is None and kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs ref_logp (reference-model log-probs)")
    m = mask.bool()
    logp = torch.where(m, logp, old_logp.detach())  # [b, T] masked positions: rho = 1
    surrogate_loss = POLICY_LOSSES.get(surrogate)
    pg_tok, clipped = surrogate_loss(logp, old_logp, advantages, clip_low, clip_high)
    pg = aggregate_loss(pg_tok, mask, mode, global_tokens, global_seqs)
    if ref_logp is not None:
        ref = torch.where(m, ref_logp.detach(), logp.detach())  # [b, T] masked: k3 = 0
        kl_tok = k3_kl(logp, ref)  # [b, T]
        kl_term = aggregate_loss(kl_tok, mask, mode, global_tokens, global_seqs)
    else:
        kl_tok = torch.zeros_like(pg_tok)
        kl_term = pg.new_zeros(())
    loss = pg + kl_coef * kl_term if kl_coef != 0.0 else pg

    n_tok = global_tokens if stats_tokens is None else stats_tokens
    if n_tok <= 0:
        raise ValueError(f"stats_tokens must be positive, got {n_tok}")
    with torch.no_grad():
        ratio = safe_ratio(logp - old_logp)  # [b, T]
        stats = {
            "loss": loss.detach(),
            "pg_loss": pg.detach(),
            "kl_loss": kl_term.detach(),
            "clip_frac": masked_sum(clipped, mask) / n_tok,
            "ratio": masked_sum(ratio, mask) / n_tok,
            "kl": masked_sum(kl_tok.detach(), mask) / n_tok,
        }
    return loss, stats
