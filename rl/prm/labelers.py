"""Step labelers: binary labels for the steps of sampled solutions, and what they cost.

A labeler takes solutions (`StepSolution`: prompt, steps, gold answer, verifier outcome) and
returns `StepExample`s (rl/prm/data.py) carrying one label per step and the labels' cost.
Chosen by registered name (`LABELERS`) or by a `package.module:function` import path:

- `exact`: the built-in arithmetic task's exact labels (`rl.tasks.arith.first_error_step`):
  steps before the first wrong step are True, that step and every later one False. A
  response that stops before its answer line has its last step labelled wrong (the step
  that ended it), as the `gold_steps` head penalises it. It stands for a strong teacher or
  a judge: cost `teacher_labels` = one per step.
- `mc_hard` (Math-Shepherd's hard estimation, Wang et al. 2024): step h < H is good if any of
  `n_mc` continuations sampled from the policy after the prefix ending at step h succeeds
  (its verifier outcome >= 0.5); the last step's label is the solution's own outcome. Cost
  `mc_rollouts` = n_mc * (H - 1).
- `mc_soft`: the same rollouts; `label_values` = the share of successful continuations (the
  last step: its own outcome, 0 or 1), `labels` = share >= `threshold` (default 0.5).
- a user callable `fn(prompt, steps, answer) -> list[bool]`, one bool per step; cost
  `teacher_labels` = one per step.

Departures: Math-Shepherd also rolls out from the final step; here the finished response's
outcome is its label (no rollouts), as in `rl.rollout.mc_values`. Continuations get the full
`max_new_tokens` budget from every prefix.

Monte-Carlo labelers take a `ContinuationFn`, so tests pass a fake one; the policy-backed
one (`rollout_continuations`) reuses `rl.rollout.mc_values` on the project's rollout backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rl.core.errors import ConfigError
from rl.core.registry import Registry, import_object
from rl.prm.data import COST_KEYS, StepExample

SUCCESS = 0.5
"""A continuation succeeds when its verifier outcome is at least this."""


@dataclass
class StepSolution:
    """One sampled solution cut into steps, ready to be labelled."""

    prompt: str
    """The problem text (the prompt column, before any chat template)."""
    steps: list[str]
    """[H] step texts, H >= 1, without their delimiter."""
    answer: str | None
    """The gold answer, when the data has one."""
    outcome: float
    """The verifier's score of the whole response, in [0, 1]."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Columns copied into the example (e.g. `prompt_index`, `sample`)."""
    handle: Any = None
    """What a `ContinuationFn` needs to roll out from this solution's prefixes (the sampled
    token ids); labelers never read it."""


ContinuationFn = Callable[
    [Sequence[StepSolution], Sequence[tuple[int, int]], int], list[list[float]]
]
"""`fn(solutions, prefixes, n_mc) -> outcomes`: for each of N prefixes `(i, h)` (solution
`solutions[i]` up to the end of its step h, 1 <= h < H), the verifier outcomes of `n_mc`
continuations sampled after it: N lists of n_mc floats in [0, 1]."""

Labeler = Callable[[Sequence[StepSolution]], list[StepExample]]
"""Labels a batch of solutions: one `StepExample` per solution, in order."""


@dataclass(frozen=True)
class LabelerOptions:
    """Settings the built-in labelers read."""

    n_mc: int = 8
    """`mc_hard`/`mc_soft`: continuations sampled after each step prefix."""
    threshold: float = 0.5
    """`mc_soft`: a step is labelled good when its success share is at least this."""
    modulus: int | None = None
    """`exact`: the arithmetic task's modulus (None: the task's default)."""
    continuations: ContinuationFn | None = None
    """`mc_hard`/`mc_soft`: samples continuations (required by them)."""


LABELERS: Registry[Callable[[LabelerOptions], Labeler]] = Registry("step labeler")
ROLLOUT_LABELERS: tuple[str, ...] = ("mc_hard", "mc_soft")
"""Labelers that sample continuations from the policy (they need a verifier)."""


def cost(teacher_labels: int = 0, mc_rollouts: int = 0) -> dict[str, int]:
    """One example's label cost."""
    return dict(zip(COST_KEYS, (teacher_labels, mc_rollouts), strict=True))


def to_example(
    sol: StepSolution,
    labels: list[bool],
    spent: dict[str, int],
    label_values: list[float] | None = None,
) -> StepExample:
    """The `StepExample` of a labelled solution."""
    return StepExample(
        prompt=sol.prompt,
        completions=list(sol.steps),
        labels=labels,
        answer=sol.answer,
        label_values=label_values,
        cost=spent,
        extra=dict(sol.extra),
    )


# ----------------------------------------------------------------------------------------------
# Label rules (pure)
# ----------------------------------------------------------------------------------------------


def first_error_labels(n_steps: int, first_error: int) -> list[bool]:
    """[n_steps] True before `first_error`, False from it on; -1: all True. A first error
    past the last step (a line the response never wrote) marks the last step wrong."""
    if first_error < 0:
        return [True] * n_steps
    first = min(first_error, n_steps - 1)
    return [h < first for h in range(n_steps)]


def exact_labels(prompt: str, steps: Sequence[str], modulus: int | None = None) -> list[bool]:
    """[H] exact labels of the built-in arithmetic task for `steps` (one line each) of a
    solution to the chain problem `prompt`; ConfigError when `prompt` is not one."""
    from rl.tasks.arith import first_error_step

    try:
        first = first_error_step(prompt, "\n".join(steps), modulus)
    except ValueError as err:
        raise ConfigError(
            f"labeler 'exact': {err}; it labels only the built-in task (data.train: builtin:arith)"
        ) from err
    return first_error_labels(len(steps), first)


def hard_labels(outcomes: Sequence[Sequence[float]], final_outcome: float) -> list[bool]:
    """Math-Shepherd hard estimation. outcomes: [H-1][n_mc] continuation outcomes after steps
    1..H-1 -> [H]: any success per step, then the solution's own outcome."""
    return [any(o >= SUCCESS for o in row) for row in outcomes] + [final_outcome >= SUCCESS]


def soft_values(outcomes: Sequence[Sequence[float]], final_outcome: float) -> list[float]:
    """outcomes: [H-1][n_mc] -> [H] success share per step, then the own outcome (0 or 1)."""
    shares = [sum(o >= SUCCESS for o in row) / len(row) for row in outcomes]
    return shares + [1.0 if final_outcome >= SUCCESS else 0.0]


def mc_prefixes(solutions: Sequence[StepSolution]) -> list[tuple[int, int]]:
    """The prefixes Monte-Carlo labelling rolls out from: (solution i, steps kept h) for
    h = 1..H_i - 1, solution-major."""
    return [(i, h) for i, s in enumerate(solutions) for h in range(1, len(s.steps))]


def rollout_outcomes(
    solutions: Sequence[StepSolution], opts: LabelerOptions, name: str
) -> list[list[list[float]]]:
    """Per solution, the [H-1][n_mc] outcomes of continuations after its steps 1..H-1,
    from one call of `opts.continuations` for the whole batch."""
    if opts.continuations is None:
        raise ConfigError(f"labeler {name!r} samples continuations: it needs a continuation fn")
    if opts.n_mc < 1:
        raise ConfigError(f"labeler {name!r}: n_mc must be at least 1, got {opts.n_mc}")
    prefixes = mc_prefixes(solutions)
    flat = opts.continuations(solutions, prefixes, opts.n_mc) if prefixes else []
    if len(flat) != len(prefixes) or any(len(row) != opts.n_mc for row in flat):
        raise ValueError(
            f"continuation fn returned {len(flat)} rows for {len(prefixes)} prefixes "
            f"(each must hold n_mc={opts.n_mc} outcomes)"
        )
    per_solution: list[list[list[float]]] = [[] for _ in solutions]
    for (i, _), row in zip(prefixes, flat, strict=True):
        per_solution[i].append([float(o) for o in row])
    return per_solution


# ----------------------------------------------------------------------------------------------
# Registered labelers
# ----------------------------------------------------------------------------------------------


@LABELERS.register("exact")
def exact_labeler(opts: LabelerOptions) -> Labeler:
    """The built-in task's exact first-error labels; one teacher label per step."""

    def label(solutions: Sequence[StepSolution]) -> list[StepExample]:
        return [
            to_example(s, exact_labels(s.prompt, s.steps, opts.modulus), cost(len(s.steps)))
            for s in solutions
        ]

    return label


@LABELERS.register("mc_hard")
def mc_hard_labeler(opts: LabelerOptions) -> Labeler:
    """Math-Shepherd hard estimation from `opts.n_mc` continuations per step prefix."""

    def label(solutions: Sequence[StepSolution]) -> list[StepExample]:
        outcomes = rollout_outcomes(solutions, opts, "mc_hard")
        return [
            to_example(s, hard_labels(o, s.outcome), cost(mc_rollouts=opts.n_mc * len(o)))
            for s, o in zip(solutions, outcomes, strict=True)
        ]

    return label


@LABELERS.register("mc_soft")
def mc_soft_labeler(opts: LabelerOptions) -> Labeler:
    """Success shares from `opts.n_mc` continuations per prefix; labels at `opts.threshold`."""
    if not 0.0 <= opts.threshold <= 1.0:
        raise ConfigError(f"labeler 'mc_soft': threshold must be in [0, 1], got {opts.threshold}")

    def label(solutions: Sequence[StepSolution]) -> list[StepExample]:
        outcomes = rollout_outcomes(solutions, opts, "mc_soft")
        examples = []
        for s, o in zip(solutions, outcomes, strict=True):
            values = soft_values(o, s.outcome)
            labels = [v >= opts.threshold for v in values]
            examples.append(to_example(s, labels, cost(mc_rollouts=opts.n_mc * len(o)), values))
        return examples

    return label


def callable_labeler(fn: Callable[..., Any], spec: str) -> Labeler:
    """A user's `fn(prompt, steps, answer) -> list[bool]` as a labeler; one teacher label
    per step. What it returns is checked: ConfigError naming `spec` and the prompt."""

    def label(solutions: Sequence[StepSolution]) -> list[StepExample]:
        examples = []
        for s in solutions:
            got = fn(s.prompt, list(s.steps), s.answer)
            ok = isinstance(got, list | tuple) and all(isinstance(b, bool) for b in got)
            if not ok or len(got) != len(s.steps):
                shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
                raise ConfigError(
                    f"labeler {spec!r} returned {shown} for prompt {s.prompt!r}: expected "
                    f"a list of {len(s.steps)} booleans (one per step)"
                )
            examples.append(to_example(s, list(got), cost(len(s.steps))))
        return examples

    return label


def make_labeler(spec: str, opts: LabelerOptions | None = None) -> Labeler:
    """The labeler named `spec` (a registered name, or `package.module:function` for a user
    callable `(prompt, steps, answer) -> list[bool]`); one-line ConfigError otherwise."""
    opts = opts or LabelerOptions()
    if ":" in spec:
        fn = import_object(spec, "step labeler", "package.module:function", ConfigError)
        if not callable(fn):
            raise ConfigError(f"step labeler {spec!r} is not callable")
        return callable_labeler(fn, spec)
    return LABELERS.get(spec)(opts)


def check_labeler_name(spec: str) -> None:
    """ConfigError unless `spec` is a registered labeler or an import path (which is only
    imported by `make_labeler`)."""
    if ":" not in spec:
        LABELERS.get(spec)


# ----------------------------------------------------------------------------------------------
# The policy behind the labelers: sampled solutions and their continuations
# ----------------------------------------------------------------------------------------------


def record_steps(
    tokenizer: Any, response_ids: Sequence[int], step_ends: Sequence[int]
) -> list[str]:
    """[H] the text of each step of a sampled response, cut at its step-end tokens (as
    `rl.rollout.steps` cut them), without the delimiter and surrounding whitespace."""
    from rl.rollout.steps import decode_offsets

    text, offsets = decode_offsets(tokenizer, response_ids)
    steps, start = [], 0
    for end in step_ends:
        steps.append(text[offsets[start][0] : offsets[end][1]].strip())
        start = end + 1
    return steps


def rollout_continuations(
    rollout: Any, model: Any, tokenizer: Any, verifier: Any, sampling: Any
) -> ContinuationFn:
    """A `ContinuationFn` that samples from `model` through the rollout backend and judges
    with `verifier` (`rl.rollout.mc_values.continuation_outcomes`). Each solution's `handle`
    is `(SolutionRecord, PromptRow)` as `rl.pav.data.sample_candidates` made it."""
    from rl.data.prompts import batch_columns
    from rl.rollout.mc_values import continuation_outcomes, prefix_texts, step_prefixes

    def continue_from(
        solutions: Sequence[StepSolution], prefixes: Sequence[tuple[int, int]], n_mc: int
    ) -> list[list[float]]:
        ids, texts, prompts, owners = [], [], [], []
        cut: dict[int, tuple[list[list[int]], list[str]]] = {}
        for i, h in prefixes:
            record, row = solutions[i].handle
            if i not in cut:  # index 0 is the bare prompt, h the prefix after step h
                cut[i] = (
                    step_prefixes(record.prompt_ids, record.response_ids, record.step_ends),
                    prefix_texts(tokenizer, record.response_ids, record.step_ends),
                )
            ids.append(cut[i][0][h])
            texts.append(cut[i][1][h])
            prompts.append(row.text)
            owners.append(row)
        outcomes = continuation_outcomes(
            rollout, model, ids, texts, prompts, batch_columns(owners), verifier, sampling, n_mc
        )  # [N, n_mc]
        return [[float(o) for o in per_prefix] for per_prefix in outcomes.tolist()]

    return continue_from
