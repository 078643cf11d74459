"""Process reward heads: the plug-in protocol, registry, resolution and validated scoring.

A reward head turns a batch of rollouts into dense rewards on response tokens. It may be an
outcome verifier (reward on the last token), a step-level PRM (reward on each step's last
token) or a token-level one (e.g. an implicit PRM), and it may learn online (PRIME's `update`
on each RL step's rollouts and their outcomes). No model code lives here: heads are plug-ins
that implement `RewardHead` and are resolved by registered name or `package.module:ClassName`.

Shapes: B rollouts (grouped contiguously, `group_size` per prompt), Tp prompt tokens (left
padded), Tr response tokens (right padded); response column 0 is the first response token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from rl.core.errors import ConfigError, RewardError, one_line
from rl.core.registry import Registry, import_object

Granularity = Literal["outcome", "step", "token"]
GRANULARITIES: tuple[str, ...] = ("outcome", "step", "token")


@dataclass
class HeadBatch:
    """What a reward head receives for one batch of B rollouts."""

    input_ids: Tensor
    """[B, Tp + Tr] int64, prompt (left padded) then response (right padded)."""
    attention_mask: Tensor
    """[B, Tp + Tr] 0/1."""
    response_mask: Tensor
    """[B, Tr] float 0/1 on response tokens."""
    prompt_length: int
    """Tp: response token t is column `prompt_length + t` of `input_ids`."""
    step_id: Tensor
    """[B, Tr] int64, each response token's step (0-based), -1 off the response."""
    step_end: Tensor
    """[B, Tr] float 0/1 on each step's last token."""
    completions: list[str]
    """[B] decoded responses."""
    group_size: int
    """K, samples per prompt (rows p*K .. p*K+K-1 share a prompt)."""
    prompts: list[str] = field(default_factory=list)
    """[B] prompt texts (after the chat template)."""
    columns: dict[str, list[Any]] = field(default_factory=dict)
    """Dataset columns (e.g. the reference answer), each a list of length B."""

    @property
    def batch_size(self) -> int:
        return int(self.response_mask.shape[0])

    @property
    def response_length(self) -> int:
        return int(self.response_mask.shape[1])


@dataclass
class HeadOutput:
    """A head's scores for one batch."""

    token_rewards: Tensor
    """[B, Tr]: 0 outside the response; a step reward sits on the step's last token, an
    outcome reward on the last response token."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Scalars to log (the trainer prefixes them with the head's name)."""


@dataclass
class HeadContext:
    """What the trainer (or `launch/eval_prm.py`) hands a head's optional `setup(ctx)`:
    enough to build models, DeepSpeed engines and fresh rollouts. Fields a caller cannot
    provide are None (eval_prm has no policy engine and no rollout backend)."""

    cfg: Any
    """The run's `rl.config.Config`."""
    dist: Any
    """`rl.engine.deepspeed_engine.DistInfo` (rank, world size)."""
    tokenizer: Any
    """The policy's tokenizer."""
    policy_path: str
    """Resolved path of the start policy (the SFT model heads such as the implicit PRM
    initialise from)."""
    ds_config: dict[str, Any]
    """The policy's DeepSpeed config (copy it; do not mutate)."""
    micro_batch_size: int
    """Sequences per forward pass."""
    local_batch_size: int
    """Sequences this rank scores per step (B)."""
    reference: Any = None
    """The trainer's frozen reference module (None when it has none: build your own)."""
    policy: Any = None
    """Callable returning the current policy module (for fresh rollouts), or None."""
    rollout: Any = None
    """The trainer's `rl.rollout.backend.RolloutBackend`, or None."""
    verifier: Any = None
    """`fn(prompts, completions, columns) -> Tensor [N]` outcome in [0, 1], or None."""
    sampling: Any = None
    """`rl.rollout.backend.SamplingSettings` of training rollouts, or None."""


@runtime_checkable
class RewardHead(Protocol):
    """The plug-in protocol for process reward heads."""

    name: str
    granularity: Granularity

    def score(self, batch: HeadBatch) -> HeadOutput:
        """Dense rewards for the batch (no gradient needed)."""
        ...

    def update(self, batch: HeadBatch, outcome: Tensor) -> dict[str, float]:
        """Learn from the batch's verifier outcomes `outcome: [B]` (online heads such as
        PRIME's implicit PRM); heads that do not learn return {}. Returns metrics to log."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


class StatelessHead:
    """Base for heads that neither learn online nor keep state: `update` does nothing and
    the state is empty. A subclass sets `name` and `granularity` and defines `score`."""

    def update(self, batch: HeadBatch, outcome: Tensor) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        return None


# Optional methods the trainer calls when a head defines them (not part of the Protocol, so
# that a 20-line head needs none of them):
#   setup(ctx: HeadContext) -> None         once, after construction, on every rank
#   save_checkpoint(directory: Path) -> None collective, instead of state_dict() (heads with
#   load_checkpoint(directory: Path) -> None  their own DeepSpeed engine: sharded state)
#   close() -> None                          at the end of the run


REWARD_HEADS: Registry[Any] = Registry("reward head")
"""Registered head classes (or factories): `@REWARD_HEADS.register("name")`."""

BUILTIN_HEAD_MODULES = ("rewards.implicit_prm_head", "rewards.pav")
"""Modules that register the built-in heads; imported on first resolution (they pull in
transformers/DeepSpeed, which this module does not)."""


def _register_builtin_heads() -> None:
    import importlib

    for module in BUILTIN_HEAD_MODULES:
        importlib.import_module(module)


def resolve_head(spec: str, kwargs: dict[str, Any] | None = None) -> RewardHead:
    """Instantiate the head `spec` (a registered name or `package.module:ClassName`) with
    `kwargs`. Every failure is a one-line ConfigError/RewardError naming the spec."""
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        _register_builtin_heads()
        try:
            factory = REWARD_HEADS.get(spec)
        except ConfigError as e:
            hint = "; for your own head use 'package.module:ClassName'" if "." in spec else ""
            raise ConfigError(f"{e}{hint}") from None
    else:
        factory = import_object(spec, "reward head", "package.module:ClassName", RewardError)
    if not callable(factory):
        raise RewardError(f"reward head {spec!r} is not a class ({type(factory).__name__})")
    try:
        head = factory(**kwargs)
    except TypeError as e:
        raise ConfigError(f"reward head {spec!r}: bad arguments {kwargs}: {one_line(e)}") from e
    except Exception as e:
        raise RewardError(f"reward head {spec!r}: constructing it raised {one_line(e)}") from e
    missing = [
        a
        for a in ("name", "granularity", "score", "update", "state_dict", "load_state_dict")
        if not hasattr(head, a)
    ]
    if missing:
        raise RewardError(
            f"reward head {spec!r} does not implement RewardHead: missing {', '.join(missing)}"
        )
    if head.granularity not in GRANULARITIES:
        raise RewardError(
            f"reward head {spec!r} has granularity {head.granularity!r}; "
            f"valid: {', '.join(GRANULARITIES)}"
        )
    return head


def checked_score(head: RewardHead, batch: HeadBatch, max_rows: int = 5) -> HeadOutput:
    """`head.score(batch)`, validated: an exception, a non-tensor, a wrong shape or non-finite
    values become a one-line RewardError naming the head (and the first `max_rows` offending
    batch rows), chaining the original exception. Returns the output with `token_rewards` as
    float32 (float64 kept) zeroed outside `batch.response_mask`."""
    name = getattr(head, "name", type(head).__name__)
    try:
        out = head.score(batch)
    except Exception as e:
        raise RewardError(f"reward head {name!r} raised {one_line(e)}") from e
    if not isinstance(out, HeadOutput):
        raise RewardError(f"reward head {name!r} returned {type(out).__name__}, not HeadOutput")
    r = out.token_rewards
    if not isinstance(r, Tensor):
        raise RewardError(
            f"reward head {name!r} returned token_rewards of type {type(r).__name__}, "
            "expected a Tensor"
        )
    expected = [batch.batch_size, batch.response_length]
    if list(r.shape) != expected:
        raise RewardError(
            f"reward head {name!r} returned token_rewards of the wrong shape: "
            f"expected [B, Tr] = {expected}, got {list(r.shape)}"
        )
    r = r.detach()
    if not r.is_floating_point():
        r = r.float()
    elif r.dtype not in (torch.float32, torch.float64):
        r = r.float()
    inside = batch.response_mask.to(r.device).bool()
    bad = (~torch.isfinite(r) & inside).any(dim=1)  # [B]
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:max_rows])) + (", ..." if len(rows) > max_rows else "")
        raise RewardError(
            f"reward head {name!r} returned non-finite token rewards in {len(rows)} row(s): "
            f"batch rows {shown}"
        )
    r = torch.where(inside, r, torch.zeros((), dtype=r.dtype, device=r.device))
    metrics: dict[str, float] = {}
    for k, v in out.metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward head {name!r} returned non-number metric {k!r}") from e
        if not math.isfinite(f):
            raise RewardError(f"reward head {name!r} returned metric {k!r} = {f}")
        metrics[k] = f
    return HeadOutput(token_rewards=r, metrics=metrics)
