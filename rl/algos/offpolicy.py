"""Corrections for rollouts sampled by another engine than the trainer (vLLM).

The sampler's log-probs `log pi_engine` and the trainer's `log pi_trainer` of the same sampled
tokens differ (kernels, precision, and top-p renormalisation when top_p < 1). Two pure pieces:

- `logprob_mismatch_sums`: the sums behind `rollout/logprob_mismatch`, the mean over response
  tokens of `|log pi_engine - log pi_trainer|` (summed here so ranks can all-reduce them).
- `tis_weights`: truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"): each token's advantage is multiplied by
  `min(pi_trainer / pi_engine, cap)`.
"""

from __future__ import annotations

from torch import Tensor


def logprob_mismatch_sums(engine_logp: Tensor, trainer_logp: Tensor, mask: Tensor) -> Tensor:
    """[sum of |engine - trainer| over masked tokens, masked token count] as float64 [2].

    engine_logp, trainer_logp, mask: [B, T]."""
    diff = ((engine_logp - trainer_logp).abs() * mask).sum()
    return diff.new_tensor([float(diff), float(mask.sum())]).double()


def tis_weights(trainer_logp: Tensor, engine_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """`min(exp(trainer - engine), cap)` on masked tokens, 0 elsewhere: [B, T] -> [B, T]."""
    return (trainer_logp - engine_logp).exp().clamp(max=cap) * mask
