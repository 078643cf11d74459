"""Process reward heads: the plug-in protocol, registry, resolution and validated scoring.

A reward head turns a batch of rollouts into dense rewards on response tokens. It may be an
outcome verifier (reward on the last token), a step-level PRM (reward on each step's last
token) or a token-level one (e.g. an implicit PRM), and it may learn online (PRIME's `update`
on each RL step's rollouts and their outcomes). No model code lives here: heads are plug-ins
that subclass `RewardHead` and are resolved (`rewards.build`) by registered name or
`package.module:ClassName`.

Shapes: B rollouts (grouped contiguously, `group_size` per prompt), Tp prompt tokens (left
padded), Tr response tokens (right padded); response column 0 is the first response token.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as torch_dist
from torch import Tensor

from rl.core.deadline import CallTimeout, call_with_timeout
from rl.core.errors import ConfigError, RewardCallError, RewardError, one_line
from rl.core.registry import Registry
from rl.core.schema import parse_options
from rl.core.types import HeadBatch

__all__ = [
    "GRANULARITIES",
    "REWARD_HEADS",
    "Granularity",
    "HeadBatch",
    "HeadContext",
    "HeadOutput",
    "RewardHead",
    "StatelessHead",
    "checked_score",
]

Granularity = Literal["outcome", "step", "token"]
GRANULARITIES: tuple[str, ...] = ("outcome", "step", "token")


@dataclass
class HeadOutput:
    """A head's scores for one batch."""

    token_rewards: Tensor
    """[B, Tr]: 0 outside the response; a step reward sits on the step's last token, an
    outcome reward on the last response token."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Scalars to log (the trainer prefixes them with the head's name)."""
    keep: Tensor | None = None
    """[B] bool, or None (keep every row): rows to keep in the policy update. The trainer
    zeroes the response mask of the others, so they add no gradient and no loss tokens
    (e.g. the `prm` head's agreement filter)."""


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
    dtype: torch.dtype = torch.float32
    """The run's one dtype (`model.dtype`): load every model in it."""
    offload_references: bool = False
    """`model.offload_references`: frozen models' ZeRO-3 partitions live in CPU memory."""
    gradient_checkpointing: bool = False
    """`model.gradient_checkpointing`: models a head trains recompute their activations in
    the backward pass (`rl.engine.models.enable_gradient_checkpointing`)."""


class RewardHead(ABC):
    """Base class of every reward head. A subclass sets `name` and `granularity` and defines
    `score`; every other hook has a no-op default here, so a 20-line head needs none of them.

    Hooks the trainer calls, in order: `setup(ctx)` once on every rank; each step, `score`
    and `update` (`update` first when `update_first`); at checkpoints the collective
    `save_checkpoint` / `load_checkpoint`; at the end `save_pretrained` and `close`. PRM
    evaluation reads `step_values`.
    """

    name: str = ""
    """Unique among the run's heads: it keys metrics (`head/<name>/...`) and checkpoints."""
    granularity: Granularity = "step"
    """Where the rewards sit: `outcome` (last token), `step` (each step's last token) or
    `token` (every token; credit then treats each token as a step)."""
    default_credit: ClassVar[str] = "sum"
    """The credit scheme `algo.credit: auto` picks when this is the first head."""
    update_first: bool = False
    """Learn from the step's outcomes before scoring it (default: score, then learn)."""
    uses_rollout: ClassVar[bool] = False
    """The head generates with the trainer's rollout backend (`HeadContext.rollout`): a
    sleeping vLLM engine then waits until the heads have scored the step."""
    Options: ClassVar[type | None] = None
    """A dataclass of the head's keyword arguments: when set, `reward.heads[i].kwargs` are
    checked against it at load time (unknown keys and wrong types name the key)."""

    def setup(self, ctx: HeadContext) -> None:
        """Build models and engines once the run's context is known (every rank)."""
        return None  # no-op default

    @abstractmethod
    def score(self, batch: HeadBatch) -> HeadOutput:
        """Dense rewards `[B, Tr]` for the batch (no gradient needed)."""

    def update(self, batch: HeadBatch, outcome: Tensor) -> dict[str, float]:
        """Learn from the batch's verifier outcomes `outcome: [B]` (online heads such as
        PRIME's implicit PRM). Returns metrics to log; heads that do not learn keep this."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Small picklable state saved by the default `save_checkpoint`."""
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        return None  # no-op default

    def save_checkpoint(self, directory: Path) -> None:
        """Collective: write the head's state under `directory`. Default: rank 0 saves
        `state_dict()` to `directory/state.pt`. Heads with sharded engines override this."""
        if not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict(), directory / "state.pt")

    def load_checkpoint(self, directory: Path) -> None:
        """Collective: restore what `save_checkpoint` wrote."""
        file = directory / "state.pt"
        if not file.is_file():
            raise ConfigError(f"trainer.resume: no state for reward head {self.name!r} in {file}")
        self.load_state_dict(torch.load(file, weights_only=False))

    def save_pretrained(self, directory: Path) -> None:
        """At the end of training: write a learned model in Hugging Face format (collective)."""
        return None  # no-op default

    def close(self) -> None:
        """Release engines and files at the end of the run."""
        return None  # no-op default

    def step_values(self, batch: HeadBatch) -> Tensor:
        """Each response token's probability `[B, Tr]` that the solution is still right
        (read at step ends by PRM evaluation). Default: the token rewards as log-odds
        increments, `sigmoid(sum_{t' <= t} r_t')`; heads with values of their own (PAV's
        Q^pi) override this."""
        rewards = checked_score(self, batch).token_rewards.double().cpu()  # [B, Tr]
        return torch.sigmoid(torch.cumsum(rewards, dim=1)).float()


class StatelessHead(RewardHead):
    """A head that neither learns online nor keeps state: the base class's defaults."""


REWARD_HEADS: Registry[type[RewardHead]] = Registry("reward head")
"""Registered head classes: `@REWARD_HEADS.register("name")` (the built-in heads register
in their modules, which `rewards.build.resolve_head` imports)."""


def head_options(cls: type[RewardHead], kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Check `kwargs` against the head's `Options` dataclass (when it has one) and return
    them with defaults filled in; errors name `where.<key>`."""
    if cls.Options is None:
        return dict(kwargs)
    options: Any = parse_options(cls.Options, kwargs, where)
    return {f: getattr(options, f) for f in options.__dataclass_fields__}


def checked_score(
    head: RewardHead, batch: HeadBatch, max_rows: int = 5, timeout_s: float | None = None
) -> HeadOutput:
    """`head.score(batch)`, validated: an exception or a call past `timeout_s` seconds become
    a one-line RewardCallError naming the head and the rows, chaining the original exception;
    a non-tensor, a wrong shape or non-finite values a RewardError naming the head (and the
    first `max_rows` offending batch rows). Returns the output with `token_rewards` as
    float32 (float64 kept) zeroed outside `batch.response_mask`."""
    name = head.name
    try:
        out = call_with_timeout(head.score, timeout_s, batch)
    except CallTimeout:
        raise RewardCallError(
            f"reward head {name!r} timed out after {timeout_s:g} s (reward.timeout_s) scoring "
            f"rows 0-{batch.batch_size - 1}"
        ) from None
    except Exception as e:
        raise RewardCallError(f"reward head {name!r} raised {one_line(e)}") from e
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
    return HeadOutput(token_rewards=r, metrics=metrics, keep=_checked_keep(name, out.keep, batch))


def _checked_keep(name: str, keep: Any, batch: HeadBatch) -> Tensor | None:
    """A head's `keep` as a bool tensor [B] on the batch's device (None stays None); a
    wrong type or shape is a one-line RewardError naming the head."""
    if keep is None:
        return None
    if not isinstance(keep, Tensor) or list(keep.shape) != [batch.batch_size]:
        got = list(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
        raise RewardError(
            f"reward head {name!r} returned keep of the wrong shape or type: expected a "
            f"[B] = [{batch.batch_size}] tensor, got {got}"
        )
    return keep.detach().bool().to(batch.response_mask.device)
