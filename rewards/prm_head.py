"""`prm`: step rewards from a discriminative PRM, shaped so the policy cannot farm them.

The head loads any PRM in the conventions of `rl.prm.convention` (a directory written by
`launch/train_prm.py` / `rl.prm.model.save_prm`, or an off-the-shelf PRM given its convention
by options), with its own tokenizer and chat format, which may differ from the policy's. Per
response it:

1. recovers the text of each step exactly as the trainer cut it: the policy's response tokens
   are decoded with the trainer's own offsets (`rl.rollout.steps.decode_offsets`), and step h
   is the text of the delimiter-separated segments that the trainer's step h owns (the
   delimiter itself, and blank segments, are not step text: the PRM's convention has its own
   separator and tag);
2. re-renders the *raw* problem (the dataset's prompt column, `data.prompt_column`; not the
   policy's chat-templated prompt) and those steps for the PRM (`rl.prm.convention`), and
   reads `p_h = P(good)` at each step tag (`rl.prm.model.step_probabilities`);
3. shapes `p` into step rewards (`rl.algos.prm_shaping`: `prob`, `min`, `clip`, `delta`,
   `first_error`) and puts step h's reward on the policy's last token of step h;
4. with `outcome_gate`, keeps the step rewards of wrong responses only (the trainer's outcome
   verifier says whether a response holds an error, the PRM where: `gate_by_outcome`); with
   `gate_fallback` too, a wrong response the PRM flags nowhere takes the penalty at its
   lowest-p step (`penalise_unflagged`); with `trust`, the step rewards are scaled by the
   PRM's agreement with the outcome on the batch, all ranks (`trust_weight`);
5. with `agreement_filter`, asks the trainer's outcome verifier for each response's outcome
   and returns `keep: [B]`: rows whose PRM verdict disagrees with the outcome are dropped from
   the policy update (PROF; the trainer zeroes their response mask).

With `refresh_every: N > 0` the PRM is not frozen: every N RL steps the head labels the
policy's current responses with a teacher (`refresh_labeler`) and trains the PRM on them
(`rl.prm.refresh`); the labels bought are counted in its metrics (`head/prm/teacher_labels`,
cumulative) and checkpoints, and the refreshed PRM is written at the end of the run.

Credit (`algo.credit: auto`) follows the shaping (`SHAPING_CREDIT`): `min` -> `min_form`,
`delta` -> `sum`, `prob` / `clip` / `first_error` -> `pav`.

Under ZeRO-3 the PRM is a ZeRO-3 inference engine (as `PAVHead`'s verifier): its forward
passes are collective, so every rank scores every row of its batch (rows without steps too)
in the same number of micro-batches (the trainer's batches are equal across ranks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rewards.heads import REWARD_HEADS, HeadBatch, HeadContext, HeadOutput, RewardHead
from rl.algos.credit import steps_to_tokens
from rl.algos.prm_shaping import (
    GATEABLE,
    SHAPING_CREDIT,
    ShapingParams,
    agreement_keep,
    check_reduction,
    flag_counts,
    gate_by_outcome,
    penalise_unflagged,
    shaping_fn,
    trust_weight,
)
from rl.core.errors import ConfigError, RewardError

CONVENTION_KEYS: tuple[str, ...] = (
    "step_tag",
    "head",
    "good_token",
    "bad_token",
    "prompt_format",
    "prompt_suffix",
    "step_separator",
)
"""The head's options that override the PRM's saved convention (`rl.prm.convention`)."""


@dataclass(frozen=True)
class PRMHeadOptions:
    """`reward.heads[i].kwargs` of the `prm` head."""

    path: str
    """A PRM directory (`launch/train_prm.py`, `rl.prm.model.save_prm`) or a hub name."""
    shaping: str = "min"
    """Step rewards from p_h: prob, min (PURE), clip, delta (Gao et al. 2024), first_error."""
    eta: float = 0.5
    """`clip`: r_h = min(p_h - eta, 0)."""
    threshold: float = 0.5
    """`first_error`: a step with p_h < threshold is wrong; also the agreement filter's."""
    penalty: float = 1.0
    """`first_error`: reward of the first wrong step is -penalty."""
    agreement_filter: bool = False
    """Drop from the policy update the responses whose PRM verdict disagrees with the
    outcome (PROF): right with step score < threshold, or wrong with score >= threshold."""
    agreement_reduce: str = "mean"
    """The step score the filter compares: the mean (PROF) or the min of the step p_h."""
    outcome_gate: bool = False
    """Step rewards only on responses the outcome verifier calls wrong (penalty shapings:
    first_error, clip, min)."""
    gate_fallback: bool = False
    """With outcome_gate and first_error: a wrong response with no step below the threshold
    takes the penalty at its lowest-p step (every wrong response carries one penalty)."""
    trust: bool = False
    """Scale the step rewards by the share of wrong responses the PRM flags minus the share of
    right ones it flags, on each batch (step credit fades when the PRM loses the errors)."""
    micro_batch_size: int | None = None
    """Solutions per PRM forward pass (None: the trainer's micro-batch size)."""
    step_tag: str | None = None
    """Convention override: the tag after each step (one token of the PRM's tokenizer)."""
    head: str | None = None
    """Convention override: label_tokens or two_class."""
    good_token: str | None = None
    """Convention override (label_tokens): the token meaning "good"."""
    bad_token: str | None = None
    """Convention override (label_tokens): the token meaning "bad"."""
    prompt_format: str | None = None
    """Convention override: plain or chat (the PRM tokenizer's chat template)."""
    prompt_suffix: str | None = None
    """Convention override: text between the rendered prompt and the first step."""
    step_separator: str | None = None
    """Convention override: text before every step after the first."""
    refresh_every: int = 0
    """RL steps between on-policy refreshes of the PRM (0: frozen; `rl.prm.refresh`)."""
    refresh_labeler: str = "exact"
    """The teacher: a registered labeler without rollouts, or `package.module:function`."""
    refresh_rows: int = 0
    """Responses each rank labels per refresh, at random (0: every response it scored)."""
    refresh_lr: float = 1e-4
    """The PRM's learning rate in refreshes."""
    refresh_epochs: int = 1
    """Passes over each refresh's labelled solutions."""
    refresh_after_first_error: str = "drop"
    """`drop`: label each solution only up to its first wrong step; `keep`: every step."""
    refresh_replay: str | None = None
    """A step dataset (the PRM's training data) replayed in every refresh, or None."""
    refresh_replay_rows: int = 0
    """Replayed solutions per refresh (0: as many as the refresh's fresh ones)."""
    refresh_balance: bool = False
    """Weigh each refresh's good and bad step labels equally (class-balanced BCE)."""


@REWARD_HEADS.register("prm")
class PRMHead(RewardHead):
    """A frozen discriminative PRM's shaped step rewards (see the module docstring)."""

    name = "prm"
    granularity = "step"
    default_credit = "min_form"  # per instance: SHAPING_CREDIT[shaping]
    Options = PRMHeadOptions

    def __init__(
        self,
        path: str,
        shaping: str = "min",
        eta: float = 0.5,
        threshold: float = 0.5,
        penalty: float = 1.0,
        agreement_filter: bool = False,
        agreement_reduce: str = "mean",
        outcome_gate: bool = False,
        gate_fallback: bool = False,
        trust: bool = False,
        micro_batch_size: int | None = None,
        refresh_every: int = 0,
        refresh_labeler: str = "exact",
        refresh_rows: int = 0,
        refresh_lr: float = 1e-4,
        refresh_epochs: int = 1,
        refresh_after_first_error: str = "drop",
        refresh_replay: str | None = None,
        refresh_replay_rows: int = 0,
        refresh_balance: bool = False,
        **convention: str | None,
    ) -> None:
        """Every option is checked here, before any model work."""
        from rl.prm.convention import load_convention
        from rl.prm.refresh import RefreshOptions, RefreshState

        check_options(shaping, agreement_reduce, eta, threshold, penalty, micro_batch_size)
        check_gate(shaping, outcome_gate, gate_fallback)
        unknown = sorted(set(convention) - set(CONVENTION_KEYS))
        if unknown:
            raise ConfigError(f"prm head: unknown option {unknown[0]!r}")
        self.refresh = RefreshOptions(
            refresh_every,
            refresh_labeler,
            refresh_rows,
            refresh_lr,
            refresh_epochs,
            refresh_after_first_error,
            refresh_replay,
            refresh_replay_rows,
            refresh_balance,
        )
        self.refresh.check()
        self.refresh_state = RefreshState()
        self.overrides = {k: v for k, v in convention.items() if v is not None}
        self.path = _checked_path(path)
        self.convention = load_convention(self.path, self.overrides)  # JSON only, no weights
        self.shaping = shaping
        self.params = ShapingParams(eta=eta, threshold=threshold, penalty=penalty)
        self.agreement_filter = agreement_filter
        self.agreement_reduce = agreement_reduce
        self.outcome_gate = outcome_gate
        self.gate_fallback = gate_fallback
        self.trust = trust
        self.micro_batch_size = micro_batch_size
        self.default_credit = SHAPING_CREDIT[shaping]  # type: ignore[misc]
        self._init_run_state()

    def _init_run_state(self) -> None:
        """What `setup` fills in from the run (nothing loaded yet)."""
        self.model: Any = None
        """The PRM module that scores (under ZeRO-3, the engine's partitioned module)."""
        self.engine: Any = None
        """The engine that trains it in refreshes (None when frozen)."""
        self.labeler: Any = None
        self.replay_pool: list[Any] = []
        """The replay dataset's examples (`refresh_replay`), cut as the refresh cuts."""
        self.dist: Any = None
        self.seed = 0
        self._scored: tuple[Tensor, Tensor, Tensor] | None = None
        """(response_ids, p, step_mask [B, H]) of the last scored batch (the refresh's F1)."""
        self.prm_tokenizer: Any = None
        self.policy_tokenizer: Any = None
        self.verifier: Any = None
        self.delimiter = "\n"
        self.prompt_column = "prompt"

    def setup(self, ctx: HeadContext) -> None:
        """Load the PRM on every rank (frozen: a ZeRO-3 inference engine under ZeRO-3, else a
        copy on this rank's device; with refreshes: a training engine) and keep what
        re-rendering needs from the run."""
        from rl.engine.deepspeed_engine import create_reference
        from rl.prm.model import load_prm

        if ctx.tokenizer is None:
            raise ConfigError("prm head: needs the policy's tokenizer to recover step texts")
        self.policy_tokenizer = ctx.tokenizer
        if ctx.cfg is not None:
            self.delimiter = ctx.cfg.reward.step_delimiter
            self.prompt_column = ctx.cfg.data.prompt_column
            self.seed = ctx.cfg.seed
        self.verifier = ctx.verifier
        self.micro_batch_size = self.micro_batch_size or ctx.micro_batch_size
        model, self.prm_tokenizer = load_prm(self.path, ctx.dtype, self.overrides)
        if self.refresh.enabled:
            self._setup_refresh(ctx, model)
        else:
            self.model = create_reference(model, ctx.ds_config, offload=ctx.offload_references)

    def _setup_refresh(self, ctx: HeadContext, model: Any) -> None:
        """A training engine for the PRM (DeepSpeed with the run's config in the launcher, a
        plain AdamW `TorchEngine` for library calls without one) and the teacher."""
        from rl.engine import deepspeed_engine as eng
        from rl.engine.models import enable_gradient_checkpointing
        from rl.prm.fitting import TorchEngine
        from rl.prm.labelers import make_labeler
        from rl.prm.refresh import load_replay

        self.labeler = make_labeler(self.refresh.labeler, labeler_options(ctx.cfg))
        if self.refresh.replay is not None:
            self.replay_pool = load_replay(self.refresh.replay, self.refresh.after_first_error)
        self.dist = ctx.dist or eng.DistInfo(rank=0, world_size=1, local_rank=0)
        if ctx.gradient_checkpointing:
            enable_gradient_checkpointing(model.lm)
        mbs = int(self.micro_batch_size or 1)
        if not ctx.ds_config:
            self.engine = TorchEngine(model, self.refresh.lr)
            self.model = model.eval()
            return
        ds = dict(ctx.ds_config)
        ds["train_micro_batch_size_per_gpu"] = mbs
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = mbs * self.dist.world_size
        self.engine = eng.create_policy_engine(
            model, ds, lr=self.refresh.lr, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0
        )
        self.engine.eval()
        self.model = self.engine.module

    # ------------------------------------------------------------------ reading the PRM
    def step_texts(self, batch: HeadBatch) -> tuple[list[str], list[list[str]]]:
        """(raw problems [B], step texts [B][H_b]): H_b is row b's number of step ends."""
        problems = raw_problems(batch, self.prompt_column)
        # one host read per tensor for the whole batch, not one per row
        ends, step_ids = batch.step_end.tolist(), batch.step_id.tolist()
        ids = batch.response_ids.tolist()
        steps = [
            row_step_texts(self.policy_tokenizer, ends[b], step_ids[b], ids[b], self.delimiter)
            for b in range(batch.batch_size)
        ]
        return problems, steps

    def step_probs(self, batch: HeadBatch) -> tuple[Tensor, Tensor]:
        """(p [B, H], step_mask [B, H]): the PRM's P(good) of each step, valid steps first."""
        from rl.prm.model import step_probabilities

        if self.model is None:
            raise RuntimeError("prm head: setup(ctx) was not called")
        problems, steps = self.step_texts(batch)
        probs = step_probabilities(
            self.model, self.prm_tokenizer, problems, steps, self.micro_batch_size or 16
        )  # [B][H_b]
        return pad_steps(probs)

    def score(self, batch: HeadBatch) -> HeadOutput:
        from rl.engine.deepspeed_engine import all_reduce_sum

        p, step_mask = self.step_probs(batch)  # [B, H] each
        self._scored = (batch.response_ids, p, step_mask) if self.refresh.enabled else None
        shaped = shaping_fn(self.shaping)(p, step_mask, self.params)  # [B, H]
        outcome = self._outcome(batch)  # [B] or None
        weight = None  # the trust weight (all ranks: collective)
        if self.trust and outcome is not None:  # before the fallback flags every wrong row
            weight = trust_weight(
                all_reduce_sum(flag_counts(p, step_mask, outcome, self.params.threshold))
            )
        if self.outcome_gate and outcome is not None:
            shaped = gate_by_outcome(shaped, outcome)
            if self.gate_fallback:
                shaped = penalise_unflagged(shaped, p, step_mask, outcome, self.params.penalty)
        if weight is not None:
            shaped = shaped * weight
        token_rewards = steps_to_tokens(shaped, batch.step_end.to(shaped.device).float())
        keep = None  # [B] rows whose PRM verdict agrees with the outcome
        if self.agreement_filter and outcome is not None:
            keep = agreement_keep(
                outcome, p, step_mask, self.params.threshold, self.agreement_reduce
            )
        metrics = prm_metrics(p, step_mask, self.params.threshold, keep)
        if weight is not None:
            metrics["trust"] = weight
        return HeadOutput(token_rewards=token_rewards, metrics=metrics, keep=keep)

    def _outcome(self, batch: HeadBatch) -> Tensor | None:
        """[B] outcomes from the trainer's verifier when the gate or the filter needs them."""
        wanted = [k for k in ("outcome_gate", "agreement_filter", "trust") if getattr(self, k)]
        if not wanted:
            return None
        if self.verifier is None:
            raise ConfigError(
                f"prm head: {wanted[0]} needs the trainer's outcome verifier; there is "
                f"none here (turn {wanted[0]} off outside launch/train_rl.py)"
            )
        outcome = self.verifier(batch.prompts, batch.completions, batch.columns)  # [B]
        return outcome.float().cpu()

    # ------------------------------------------------------------------ on-policy refresh
    def update(self, batch: HeadBatch, outcome: Tensor) -> dict[str, float]:
        """Every `refresh_every` calls: label this rank's share of the batch with the teacher,
        gather every rank's labelled solutions and train the PRM on them (collective).
        Metrics: cumulative teacher labels and, on refresh steps, the PRM's first-error F1
        and first-error recall on the fresh labels (before it learns from them) and the
        refresh's training loss. Frozen heads return {}."""
        from rl.prm.data import total_cost
        from rl.prm.refresh import (
            draw_replay,
            gather_examples,
            label,
            on_policy_scores,
            pick_rows,
            solutions_of,
            train_on,
        )

        if not self.refresh.enabled:
            return {}
        state = self.refresh_state
        state.calls += 1
        metrics = {"teacher_labels": float(state.teacher_labels)}
        if state.calls % self.refresh.every:
            return metrics
        problems, steps = self.step_texts(batch)
        # the training order and the replay draw are the same on every rank (each rank trains
        # on its share of one order); the rows each rank labels are its own
        shared_seed = self.seed * 1_000_003 + state.calls * 101
        rows = pick_rows(range(batch.batch_size), self.refresh.rows, shared_seed + self.dist.rank)
        answers = batch.columns.get("answer")
        solutions = solutions_of(problems, steps, answers, outcome.tolist(), rows)
        mine = label(self.labeler, solutions, self.refresh.after_first_error)
        probs = self._probs_of(batch, [int(ex.extra["row"]) for ex in mine])
        pairs = gather_examples(list(zip(mine, probs, strict=True)))  # every rank's
        examples = [ex for ex, _ in pairs]
        before = on_policy_scores([p for _, p in pairs], examples, self.params.threshold)
        replayed = []
        if self.replay_pool:
            want = self.refresh.replay_rows
            replayed = draw_replay(self.replay_pool, want, len(examples), shared_seed + 7)
        loss = train_on(
            self.engine,
            self.model,
            self.prm_tokenizer,
            examples + replayed,
            self.dist,
            int(self.micro_batch_size or 1),
            self.refresh.epochs,
            shared_seed,
            balance=self.refresh.balance,
        )
        state.refreshes += 1
        state.teacher_labels += total_cost(examples)["teacher_labels"]
        state.solutions += len(examples)
        metrics["teacher_labels"] = float(state.teacher_labels)
        metrics["refresh_loss"] = loss
        if replayed:
            metrics["refresh_replayed"] = float(len(replayed))
        # the same on every rank (from every rank's labels); NaN (no case) is left out
        for key, value in before.items():
            if math.isfinite(value):
                metrics[f"refresh_{key}"] = value
        return metrics

    def _probs_of(self, batch: HeadBatch, rows: Sequence[int]) -> list[list[float]]:
        """P(good) of the steps of batch `rows` as `score` computed them (scored again when
        the batch is not the one scored last)."""
        if self._scored is not None and self._scored[0] is batch.response_ids:
            p, mask = self._scored[1], self._scored[2]
        else:
            p, mask = self.step_probs(batch)
        counts = mask.sum(dim=1).long().tolist()
        return [p[b, : counts[b]].tolist() for b in rows]

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.refresh_state)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        from rl.prm.refresh import RefreshState

        self.refresh_state = RefreshState(**d)

    def _sharded(self) -> bool:
        """Whether the refreshed PRM lives in a DeepSpeed engine (checkpointed with it)."""
        return self.refresh.enabled and hasattr(self.engine, "save_checkpoint")

    def save_checkpoint(self, directory: Path) -> None:
        """The refresh counters, and with refreshes the PRM's weights and optimizer (sharded
        as its engine keeps them); collective."""
        if self._sharded():
            self.engine.save_checkpoint(
                str(directory.parent), tag=directory.name, save_latest=False
            )
        super().save_checkpoint(directory)

    def load_checkpoint(self, directory: Path) -> None:
        if self._sharded():
            loaded, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
            if loaded is None:
                raise ConfigError(f"prm head: no refreshed PRM checkpoint in {directory}")
        super().load_checkpoint(directory)

    def save_pretrained(self, directory: Path) -> None:
        """With refreshes, the refreshed PRM in its convention (`save_prm`; collective, rank
        0 writes), loadable by another run's `prm` head."""
        from rl.prm.fitting import full_state
        from rl.prm.model import save_prm

        if not self.refresh.enabled:
            return
        state = full_state(self.engine)
        if self.dist.is_main:
            save_prm(self.model, self.prm_tokenizer, directory, state)

    def step_values(self, batch: HeadBatch) -> Tensor:
        """p_h on every token of step h, 0 off the response: [B, Tr]."""
        p, _ = self.step_probs(batch)  # [B, H]
        step_id = batch.step_id.to(p.device).long()  # [B, Tr]
        if p.shape[1] == 0:
            return torch.zeros(step_id.shape)
        picked = p.gather(1, step_id.clamp(min=0, max=p.shape[1] - 1))  # [B, Tr]
        return torch.where(step_id >= 0, picked, torch.zeros_like(picked))


# --------------------------------------------------------------------------------------------
# Helpers (no model)
# --------------------------------------------------------------------------------------------


def labeler_options(cfg: Any) -> Any:
    """The refresh teacher's `LabelerOptions`: the built-in task's modulus for `exact` when
    the run trains on it (the labeler's own default otherwise)."""
    from rl.prm.labelers import LabelerOptions

    if cfg is None or not str(cfg.data.train).startswith("builtin:arith"):
        return LabelerOptions()
    from rl.tasks.arith import ArithConfig

    return LabelerOptions(modulus=ArithConfig(**dict(cfg.data.task)).modulus)


def check_options(
    shaping: str,
    agreement_reduce: str,
    eta: float,
    threshold: float,
    penalty: float,
    micro_batch_size: int | None,
) -> None:
    """One-line ConfigErrors for the shaping and filter options (`PRMHeadOptions`)."""
    shaping_fn(shaping)  # names the valid shapings
    check_reduction(agreement_reduce)
    _check_range("eta", eta, 0.0, 1.0)
    _check_range("threshold", threshold, 0.0, 1.0)
    if not penalty > 0:
        raise ConfigError(f"prm head: penalty must be > 0, got {penalty}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ConfigError(f"prm head: micro_batch_size must be >= 1, got {micro_batch_size}")


def check_gate(shaping: str, outcome_gate: bool, gate_fallback: bool) -> None:
    """One-line ConfigErrors for the outcome gate's options."""
    if outcome_gate and shaping not in GATEABLE:
        raise ConfigError(
            f"prm head: outcome_gate needs a penalty shaping {list(GATEABLE)}, "
            f"got shaping {shaping!r}"
        )
    if gate_fallback and not (outcome_gate and shaping == "first_error"):
        raise ConfigError(
            "prm head: gate_fallback needs outcome_gate: true and shaping first_error, got "
            f"outcome_gate {outcome_gate}, shaping {shaping!r}"
        )


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"prm head: {name} must be in [{low}, {high}], got {value}")


def _checked_path(path: str) -> str:
    """`path`; a ConfigError when it names a local path that does not exist (a hub name,
    which has no leading '/', '.' or '~', is left to the loader)."""
    if not path:
        raise ConfigError("prm head: path is empty")
    local = path.startswith(("/", ".", "~"))
    if local and not Path(path).expanduser().exists():
        raise ConfigError(f"prm head: PRM {path} does not exist")
    return str(Path(path).expanduser()) if local else path


def raw_problems(batch: HeadBatch, column: str) -> list[str]:
    """Each row's problem from the dataset column `column` (or `prompt`, the column
    `launch/eval_prm.py`'s batches carry, when the rows lack it): a string, or the content of
    the last user message of a chat-message list. ConfigError naming the column when absent."""
    values = batch.columns.get(column, batch.columns.get("prompt"))
    if values is None:
        raise ConfigError(
            f"prm head: the rows have no {column!r} column (data.prompt_column) to read the "
            f"raw problem from; columns: {sorted(batch.columns)}"
        )
    out: list[str] = []
    for value in values:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            users = [m["content"] for m in value if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                raise RewardError(f"prm head: a {column!r} message list has no user turn")
            out.append(str(users[-1]))
        else:
            raise RewardError(f"prm head: column {column!r} holds {type(value).__name__}, not text")
    return out


def segments(text: str, delimiter: str) -> list[tuple[int, int]]:
    """Character ranges `[start, end)` of the steps of `text` as the trainer reads them: the
    segments of `text.split(delimiter)` that are neither empty nor whitespace only."""
    out: list[tuple[int, int]] = []
    pos = 0
    for piece in text.split(delimiter):
        if piece and not piece.isspace():
            out.append((pos, pos + len(piece)))
        pos += len(piece) + len(delimiter)
    return out


def span_texts(
    text: str,
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
    delimiter: str,
) -> list[str]:
    """The text of each token span (inclusive, in order): the segments (`segments`) it owns.

    Span h owns the segments from the first one its characters touch up to the next span's
    first (so a token that runs past a delimiter into the next segment does not move that
    segment's text; a segment no span starts in joins the span before, as the trainer's
    rule 3 merges it). Where that reading does not fit (no segment touched, or spans out of
    order), the span's own characters, stripped of the delimiter and blanks, are its text.
    """
    segs = segments(text, delimiter)
    firsts: list[int | None] = []
    for a, b in spans:
        c0, c1 = offsets[a][0], offsets[b][1]
        firsts.append(next((i for i, (s, e) in enumerate(segs) if s < c1 and e > c0), None))
    known = [f for f in firsts if f is not None]
    ordered = len(known) == len(spans) and all(
        x < y for x, y in zip(known, known[1:], strict=False)
    )
    if not ordered:
        return [
            text[offsets[a][0] : offsets[b][1]].strip().strip(delimiter).strip() for a, b in spans
        ]
    bounds = [*known, len(segs)]
    return [
        delimiter.join(text[s:e] for s, e in segs[bounds[h] : bounds[h + 1]])
        for h in range(len(spans))
    ]


def row_step_texts(
    tokenizer: Any,
    step_end: Sequence[float],
    step_id: Sequence[int],
    response_ids: Sequence[int],
    delimiter: str,
) -> list[str]:
    """Step texts of one row (its `[Tr]` step_end, step_id and response ids, as lists), one
    per step-end token: step h spans the tokens after step h-1's end up to its own (decoded
    with the trainer's offsets)."""
    from rl.rollout.steps import decode_offsets

    ends = [t for t, end in enumerate(step_end) if end]
    if not ends:
        return []
    first = next((t for t, step in enumerate(step_id) if step >= 0), 0)
    n = ends[-1] + 1
    text, offsets = decode_offsets(tokenizer, list(response_ids[:n]))
    starts = [first, *(e + 1 for e in ends[:-1])]
    spans = list(zip(starts, ends, strict=True))
    return span_texts(text, offsets, spans, delimiter)


def pad_steps(probs: Sequence[Sequence[float]]) -> tuple[Tensor, Tensor]:
    """[B][H_b] -> (p [B, H] float32, step_mask [B, H] float32), valid steps first."""
    h = max((len(row) for row in probs), default=0)
    p = torch.zeros(len(probs), h)
    mask = torch.zeros(len(probs), h)
    for b, row in enumerate(probs):
        p[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
        mask[b, : len(row)] = 1.0
    return p, mask


def prm_metrics(
    p: Tensor, step_mask: Tensor, threshold: float, keep: Tensor | None
) -> dict[str, float]:
    """Mean p over steps, share of steps below `threshold`, mean steps per response and the
    share of responses the agreement filter drops (0 without it)."""
    valid = step_mask.bool()
    n_steps = max(1, int(valid.sum()))
    rows = max(1, p.shape[0])
    return {
        "p_mean": float(p[valid].sum()) / n_steps,
        "below_threshold_frac": float(((p < threshold) & valid).sum()) / n_steps,
        "steps_per_response": float(valid.sum()) / rows,
        "filtered_frac": 0.0 if keep is None else float((~keep).sum()) / rows,
    }
