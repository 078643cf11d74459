"""The credit scheme of a run as one typed object: `algo.credit`.

Each scheme is a frozen dataclass selected by its `name` and holding only its own options,
with their bounds on the fields; YAML spells it `credit: pav` (the defaults) or
`credit: {name: pav, alpha: 2.0}`. A scheme also declares what the trainer must build and
feed it (class attributes), so the trainer asks the scheme instead of comparing names:

- `needs_critic`: a value model is trained beside the policy (`gae`);
- `needs_heads`: it reads the process reward heads' step rewards (every step scheme);
- `outcome_baseline`: where the outcome term's baseline comes from: `estimator` (the run's
  `algo.advantage`), `rloo` (leave-one-out by definition) or `critic`;
- `takes_kl_in_rewards`: the KL penalty can enter its token rewards (`algo.kl_mode=reward`);
- `separable`: its advantage is an outcome term plus a (maybe empty) step term, so the step
  term's share of the gradient can be measured (`rl.trainer.diagnostics`); not `gae`.

`auto` stands for the first head's `default_credit` (or `outcome` without heads) and is
resolved by the trainer once the heads are built. Step-credit functions register their spec
with `rl.algos.credit.register_credit`. Imports only the standard library and `rl.core`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from rl.core.errors import ConfigError
from rl.core.schema import Bound

OutcomeBaseline = Literal["estimator", "rloo", "critic"]
PrimeBaseline = Literal["per_step", "last_token", "per_token_mean"]

CREDIT_SPECS: dict[str, type[CreditSpec]] = {}
"""Every scheme's spec class by name (`auto` included)."""


@dataclass(frozen=True)
class CreditSpec:
    """`algo.credit`: one credit scheme with its options (subclasses, one per scheme)."""

    name: str = "auto"
    """The scheme's registered name."""

    kind: ClassVar[str] = "credit scheme"
    needs_critic: ClassVar[bool] = False
    needs_heads: ClassVar[bool] = False
    outcome_baseline: ClassVar[OutcomeBaseline] = "estimator"
    takes_kl_in_rewards: ClassVar[bool] = False
    separable: ClassVar[bool] = True

    @classmethod
    def variants(cls) -> dict[str, type[CreditSpec]]:
        """The schemes `algo.credit` may name (read by `rl.core.schema.build_variant`)."""
        return dict(CREDIT_SPECS)

    def options(self) -> dict[str, Any]:
        """The scheme's own options (every field but `name`) as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}


def register_spec(cls: type[CreditSpec]) -> type[CreditSpec]:
    """Add a spec class under its `name` default; a taken name raises."""
    name = cls.name
    if name in CREDIT_SPECS:
        raise ValueError(f"credit scheme {name!r} is already registered")
    CREDIT_SPECS[name] = cls
    return cls


def spec_for(name: str) -> CreditSpec:
    """The scheme `name` with its default options (ConfigError naming the valid ones)."""
    if name not in CREDIT_SPECS:
        raise ConfigError(
            f"algo.credit: unknown credit scheme {name!r}; valid: {', '.join(CREDIT_SPECS)}"
        )
    return CREDIT_SPECS[name]()


@register_spec
@dataclass(frozen=True)
class AutoCredit(CreditSpec):
    """The first head's `default_credit`, or `outcome` without heads (no options: name the
    scheme to set any)."""

    name: Literal["auto"] = "auto"


@register_spec
@dataclass(frozen=True)
class OutcomeCredit(CreditSpec):
    """`algo.advantage`'s estimator on the outcome rewards, the same on every token."""

    name: Literal["outcome"] = "outcome"


@register_spec
@dataclass(frozen=True)
class GAECredit(CreditSpec):
    """PPO: GAE over dense token rewards with the critic's values (`algo.lam`, `algo.gamma`,
    `algo.whiten_advantages`)."""

    name: Literal["gae"] = "gae"
    needs_critic = True
    outcome_baseline = "critic"
    takes_kl_in_rewards = True
    separable = False


@dataclass(frozen=True)
class StepCreditSpec(CreditSpec):
    """A scheme of `rl.algos.credit` that combines the outcome with the heads' step rewards."""

    needs_heads = True


@dataclass(frozen=True)
class PAVCredit(StepCreditSpec):
    """`pav`: `algo.advantage` on the outcome + alpha * the prover's step advantage."""

    name: Literal["pav"] = "pav"
    alpha: Annotated[float, Bound(ge=0)] = 0.5
    """Weight of the prover's step advantage A^mu (the paper searches 0.5-5)."""


@dataclass(frozen=True)
class SumCredit(StepCreditSpec):
    """`sum`: return-to-go of the step rewards + the outcome RLOO. Discount: `algo.gamma`."""

    name: Literal["sum"] = "sum"
    outcome_baseline = "rloo"
    process_coef: Annotated[float, Bound(ge=0)] = 1.0
    """Weight of the process return."""
    outcome_coef: Annotated[float, Bound(ge=0)] = 1.0
    """Weight of the outcome RLOO advantage."""


@dataclass(frozen=True)
class PrimeCredit(SumCredit):
    """`prime`: PRIME's Eq. 5 on the implicit-PRM step rewards. Discount: `algo.gamma`."""

    name: Literal["prime"] = "prime"  # type: ignore[assignment]
    baseline: PrimeBaseline = "per_step"
    """Where the leave-one-out baseline of the implicit reward is subtracted (see
    `rl.algos.credit.prime_advantages`): per_step (Eq. 5 literally), last_token,
    per_token_mean."""


@dataclass(frozen=True)
class MinFormCredit(SumCredit):
    """`min_form`: like `sum` on PURE's softmin-weighted step rewards."""

    name: Literal["min_form"] = "min_form"  # type: ignore[assignment]
    temperature: Annotated[float, Bound(gt=0)] = 0.1
    """Softmax temperature T of the PURE weights (T -> 0: the minimum)."""
