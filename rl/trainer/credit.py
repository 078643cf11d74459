"""Credit schemes: how a step's rewards become the learners' targets.

Every scheme has one signature, `assign(batch, scored, logprobs) -> Credit`, and is registered
by name in `CREDIT_SCHEMES` (the trainer goes only through it); its typed options and what it
needs (critic, heads, the KL in its rewards) are its spec, `algo.credit`
(`rl.algos.credit_specs`):

- `outcome`: the advantage estimator (`algo.advantage`: grpo, dr_grpo, rloo) on the outcome
  rewards, the same on every response token.
- `pav`, `prime`, `sum`, `min_form`: the step-credit functions of `rl.algos.credit` on the
  outcome rewards and the heads' step rewards, with the options of their spec.
- `gae`: PPO's credit: dense token rewards (the outcome on the last token, the heads' rewards
  on step ends, the KL penalty per token with `algo.kl_mode=reward`), the critic's values,
  GAE advantages whitened over the global batch, and returns as value targets.

The maths is in `rl.algos`; this module only routes tensors and reduces statistics over ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from rewards.heads import RewardHead
from rl.algos.advantages import ADVANTAGE_ESTIMATORS, group_rewards, token_advantages
from rl.algos.credit import CREDIT_ASSIGNERS, CreditInputs, tokens_to_steps
from rl.algos.credit_specs import AutoCredit, CreditSpec, spec_for
from rl.algos.ppo import dense_token_rewards, gae, last_valid_index, masked_moments, whiten
from rl.config import AlgoConfig, Config, check_credit_settings, outcome_estimator
from rl.core.errors import ConfigError
from rl.core.registry import Registry
from rl.core.types import Credit, LogProbs, RolloutBatch, Scored
from rl.engine import deepspeed_engine as eng
from rl.trainer.critic import Critic, explained_variance


class CreditScheme(ABC):
    """Turns one step's rewards (and log-probs) into `Credit` for this rank's rows."""

    @abstractmethod
    def assign(self, batch: RolloutBatch, scored: Scored, logprobs: LogProbs) -> Credit: ...


SchemeFactory = Callable[[CreditSpec, AlgoConfig, "Critic | None"], CreditScheme]
CREDIT_SCHEMES: Registry[SchemeFactory] = Registry("credit scheme")


class OutcomeCredit(CreditScheme):
    """The outcome estimator's sequence advantage on every response token."""

    def __init__(self, spec: CreditSpec, algo: AlgoConfig, critic: Critic | None = None) -> None:
        self.estimator = ADVANTAGE_ESTIMATORS.get(outcome_estimator(algo))

    def assign(self, batch: RolloutBatch, scored: Scored, logprobs: LogProbs) -> Credit:
        grouped = group_rewards(scored.outcome, batch.group_size)  # [P, K]
        seq_adv = self.estimator(grouped).reshape(-1)  # [B]
        return Credit(token_advantages(seq_adv, batch.response_mask))  # [B, Tr]


class StepCredit(CreditScheme):
    """A step-credit function of `rl.algos.credit` (pav, prime, sum, min_form)."""

    def __init__(self, spec: CreditSpec, algo: AlgoConfig, critic: Critic | None = None) -> None:
        self.fn = CREDIT_ASSIGNERS.get(spec.name)
        self.options = spec.options()
        self.gamma = algo.gamma
        self.outcome_estimator = outcome_estimator(algo)

    def assign(self, batch: RolloutBatch, scored: Scored, logprobs: LogProbs) -> Credit:
        assert scored.process is not None and scored.step_end is not None
        assert scored.step_id is not None
        step_scores, step_mask = tokens_to_steps(scored.process, scored.step_end)  # [B, H]
        inputs = CreditInputs(
            mask=batch.response_mask.float(),
            step_id=scored.step_id,
            step_end=scored.step_end,
            outcome=scored.outcome.float(),
            group_size=batch.group_size,
            step_scores=step_scores,
            step_mask=step_mask,
            gamma=self.gamma,
            outcome_estimator=self.outcome_estimator,
        )
        return Credit(self.fn(inputs, **self.options))


class GAECredit(CreditScheme):
    """PPO: GAE over dense token rewards with the critic's values (see the module doc)."""

    def __init__(self, spec: CreditSpec, algo: AlgoConfig, critic: Critic | None) -> None:
        if critic is None:
            raise ConfigError("algo.credit=gae needs the critic (the trainer builds it)")
        self.algo = algo
        self.critic = critic

    @torch.no_grad()
    def assign(self, batch: RolloutBatch, scored: Scored, logprobs: LogProbs) -> Credit:
        algo, mask = self.algo, batch.response_mask
        values = self.critic.values(batch)  # [B, Tr]
        kl, kl_coef = None, 0.0
        if algo.kl_mode == "reward" and logprobs.ref is not None:
            assert logprobs.old is not None  # the trainer computes them for this case
            kl, kl_coef = logprobs.old - logprobs.ref, algo.kl_coef  # k1 per token [B, Tr]
        rewards = dense_token_rewards(
            scored.outcome.float(), last_valid_index(mask), scored.process, kl, kl_coef, mask
        )  # [B, Tr]
        advantages, returns = gae(rewards, values, mask, algo.gamma, algo.lam)
        diff = torch.where(mask.bool(), returns - values, 0.0)  # [B, Tr]
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
        n_tok = max(float(moments[2]), 1.0)
        stats = {
            "critic/explained_variance": explained_variance(moments[[3, 4, 5, 6, 2]]),
            "critic/advantages_mean": float(moments[0]) / n_tok,
            "reward/token_rewards_mean": float(moments[7]) / n_tok,
        }
        if algo.whiten_advantages:
            s, ss, n = (float(x) for x in moments[:3])
            advantages = whiten(advantages, mask, global_stats=(s, ss, n))
        return Credit(advantages.float(), values, returns.float(), stats)


CREDIT_SCHEMES.register("outcome")(OutcomeCredit)
CREDIT_SCHEMES.register("gae")(GAECredit)


for _name in CREDIT_ASSIGNERS.names():
    CREDIT_SCHEMES.register(_name)(StepCredit)


def resolve_credit(cfg: Config, heads: list[tuple[RewardHead, float]]) -> CreditSpec:
    """The credit scheme's spec (`algo.credit`, `auto` resolved to the first head's default
    with its default options); ConfigError when it cannot work with the configured heads."""
    spec = cfg.algo.credit
    if isinstance(spec, AutoCredit):
        spec = spec_for(heads[0][0].default_credit if heads else "outcome")
    if spec.name not in CREDIT_SCHEMES:
        valid = ", ".join(["auto", *CREDIT_SCHEMES.names()])
        raise ConfigError(f"algo.credit: unknown credit scheme {spec.name!r}; valid: {valid}")
    if spec.needs_heads and not heads:
        raise ConfigError(
            f"algo.credit={spec.name} needs at least one process reward head in reward.heads"
        )
    check_credit_settings(cfg.algo, spec)  # again: `auto` is resolved only now
    return spec


def build_credit(spec: CreditSpec, algo: AlgoConfig, critic: Critic | None) -> CreditScheme:
    """The registered scheme of `spec` (as `resolve_credit` returned it)."""
    return CREDIT_SCHEMES.get(spec.name)(spec, algo, critic)
