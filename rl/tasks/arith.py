"""Built-in task: chains of modular arithmetic with exact step-level ground truth.

A problem is a start value and a chain of operations applied left to right, modulo
`modulus` (no operator precedence). The prompt lists them, the response computes one
intermediate value per line and ends with the answer line:

    prompt:    "3 +4 *2 -7"            (modulus 7, the default)
    response:  "3+4=0\\n0*2=0\\n0-7=0\\nAnswer: 0"

Steps: a response is split into lines at "\\n" (after dropping trailing whitespace). Line
`i < n_steps` is step `i` and must read exactly `f"{a}{op}{b}={c}"`, where `a` is the correct
running value, `op`/`b` the i-th operation of the prompt and `c = (a op b) % modulus`. Line
`n_steps` is the answer step and must read `f"Answer: {final}"`. A line holding anything else
(a wrong value, a wrong operand, garbage) is a wrong step; a missing line is wrong at its
index; an extra line after the answer is wrong at index `n_steps + 1`. Spaces around a line
are ignored. `first_error_step` returns the index of the first wrong step, or -1.

Splits: every problem belongs to exactly one split, chosen by a hash of its prompt string
(eval 10%, validation 10%, train 80%); a split's problems are drawn by rejection sampling from
the problem space, so the splits are disjoint by construction and eval never enters training.
Within a split, problems are drawn with replacement (duplicates are rare for the default
space of 7 * 21^3 problems).

Pure python: no torch import.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SPLITS: tuple[str, ...] = ("train", "validation", "eval")
"""The split names, in the order `rows` accepts them."""

_SPLIT_BUCKETS: dict[str, range] = {"eval": range(0, 10), "validation": range(10, 20)}
"""Hash buckets (out of 100) of the held-out splits; the rest (80%) is train."""

STEP_DELIMITER = "\n"
"""Separates the steps (lines) of a response."""

ANSWER_PREFIX = "Answer: "
"""Starts the final line of a response."""

_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")
_PROMPT_TERM_RE = re.compile(r"([+\-*])(\d+)")


DEFAULT_MODULUS = 7
"""Modulus of the default task (prompts do not carry it)."""


@dataclass(frozen=True)
class ArithConfig:
    """Difficulty knobs of the modular-arithmetic chain task."""

    n_steps: int = 3
    """Operations per problem (step lines per response, not counting the answer line)."""
    operand_max: int = 6
    """Operands are drawn uniformly from operand_min..operand_max (inclusive)."""
    operand_min: int = 0
    """Smallest operand. 1 removes `*0`, which resets the chain to 0 and so erases every earlier
    error; with a prime modulus every step is then one-to-one, so a wrong value stays wrong
    unless a later error happens to land on the right one."""
    modulus: int = DEFAULT_MODULUS
    """Every intermediate value is reduced modulo this; the start value is in 0..modulus-1."""
    ops: str = "+-*"
    """Operators to draw from, a subset of "+-*"."""

    def __post_init__(self) -> None:
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")
        if self.operand_max < 0:
            raise ValueError(f"operand_max must be >= 0, got {self.operand_max}")
        if not 0 <= self.operand_min <= self.operand_max:
            raise ValueError(
                f"operand_min must be in 0..operand_max ({self.operand_max}), "
                f"got {self.operand_min}"
            )
        if self.modulus < 2:
            raise ValueError(f"modulus must be >= 2, got {self.modulus}")
        if not self.ops or any(op not in "+-*" for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")


@dataclass(frozen=True)
class ArithProblem:
    """One chain: `start op[0] operands[0] op[1] operands[1] ...`, evaluated left to right."""

    start: int
    """The start value, in 0..modulus-1."""
    ops: tuple[str, ...]
    """One operator per step, each in "+-*"."""
    operands: tuple[int, ...]
    """One operand per step, same length as `ops`."""
    modulus: int
    """Values are reduced modulo this after every step."""

    @property
    def prompt(self) -> str:
        """The prompt string, e.g. "3 +4 *2 -7"."""
        return " ".join(
            [str(self.start)] + [f"{o}{b}" for o, b in zip(self.ops, self.operands, strict=True)]
        )

    def values(self) -> list[int]:
        """Running values [start, after step 0, ..., after step n-1]; length n_steps + 1."""
        out = [self.start]
        for op, b in zip(self.ops, self.operands, strict=True):
            out.append(apply_op(out[-1], op, b, self.modulus))
        return out

    @property
    def answer(self) -> int:
        """The final value."""
        return self.values()[-1]


def apply_op(a: int, op: str, b: int, modulus: int) -> int:
    """`(a op b) % modulus` for op in "+-*" (python's %, so the result is in 0..modulus-1)."""
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"unknown operator {op!r}")


def parse_prompt(prompt: str, modulus: int = DEFAULT_MODULUS) -> ArithProblem:
    """The problem a prompt string was made from; ValueError if it is not a chain prompt."""
    parts = prompt.strip().split()
    if len(parts) < 2 or not parts[0].isdigit():
        raise ValueError(f"not an arithmetic chain prompt: {prompt!r}")
    ops: list[str] = []
    operands: list[int] = []
    for part in parts[1:]:
        m = _PROMPT_TERM_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"bad term {part!r} in prompt {prompt!r}")
        ops.append(m.group(1))
        operands.append(int(m.group(2)))
    return ArithProblem(int(parts[0]), tuple(ops), tuple(operands), modulus)


def split_of(prompt: str) -> str:
    """The split ("train", "validation" or "eval") a prompt belongs to, by a hash of it."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    for name, held_out in _SPLIT_BUCKETS.items():
        if bucket in held_out:
            return name
    return "train"


def random_problem(rng: random.Random, cfg: ArithConfig) -> ArithProblem:
    """A uniformly random problem of the whole space (any split)."""
    start = rng.randrange(cfg.modulus)
    ops = tuple(rng.choice(cfg.ops) for _ in range(cfg.n_steps))
    operands = tuple(rng.randint(cfg.operand_min, cfg.operand_max) for _ in range(cfg.n_steps))
    return ArithProblem(start, ops, operands, cfg.modulus)


def sample_problems(split: str, n: int, cfg: ArithConfig, seed: int) -> list[ArithProblem]:
    """`n` problems of `split`, deterministic in (split, cfg, seed).

    The first k problems do not depend on `n`, so a larger eval set extends a smaller one.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    rng = random.Random(f"arith/{split}/{seed}")
    out: list[ArithProblem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise ValueError(f"split {split!r} of {cfg} is too small to draw {n} problems")
        problem = random_problem(rng, cfg)
        if split_of(problem.prompt) == split:
            out.append(problem)
    return out


def rows(split: str, n: int, cfg: ArithConfig, seed: int) -> list[dict[str, str]]:
    """`n` rows `{"prompt": str, "answer": str}` of `split` (see `sample_problems`)."""
    return [
        {"prompt": p.prompt, "answer": str(p.answer)} for p in sample_problems(split, n, cfg, seed)
    ]


def step_lines(problem: ArithProblem, wrong_step: int = -1, wrong_value: int = 0) -> list[str]:
    """The response lines: one per step then the answer line; length n_steps + 1.

    With `wrong_step >= 0`, that step's result is replaced by `wrong_value` and the later
    steps continue from it, as a solver that slipped once would.
    """
    lines: list[str] = []
    a = problem.start
    for i, (op, b) in enumerate(zip(problem.ops, problem.operands, strict=True)):
        c = wrong_value if i == wrong_step else apply_op(a, op, b, problem.modulus)
        lines.append(f"{a}{op}{b}={c}")
        a = c
    lines.append(f"{ANSWER_PREFIX}{a}")
    return lines


def solution(problem: ArithProblem) -> str:
    """The correct step-by-step response."""
    return STEP_DELIMITER.join(step_lines(problem))


SLIP_OP = "*"
"""The operator the demonstrations' solver sometimes gets wrong."""

CONFUSED_OP = "+"
"""What that solver applies instead (its one misconception: "*" computed as "+")."""


def slip(problem: ArithProblem) -> tuple[int, int] | None:
    """(step, wrong value) of the systematic slip, or None if the problem has no "*".

    The slip is on the first "*" step, computed as "+"; if that happens to give the right
    value, the wrong value is the right one + 1 (mod modulus).
    """
    mults = [i for i, op in enumerate(problem.ops) if op == SLIP_OP]
    if not mults:
        return None
    step = mults[0]
    a, right = problem.values()[step : step + 2]
    wrong = apply_op(a, CONFUSED_OP, problem.operands[step], problem.modulus)
    return step, wrong if wrong != right else (right + 1) % problem.modulus


@dataclass(frozen=True)
class DemoErrors:
    """How demonstrations go wrong (all off but the slip by default). A wrong step always
    continues consistently from its wrong value, as a solver that slipped would."""

    slip_rate: float = 0.6
    """Probability of the systematic slip (the first "*" computed as "+"; see `slip`)."""
    step_rate: float = 0.0
    """Every step independently wrong with this probability, with a uniformly random wrong
    value: errors at any position, but a policy imitating them is still most often right
    at every step, so its greedy decoding rarely shows them (sampling does)."""
    fact_rate: float = 0.0
    """Share of arithmetic facts (a, op, b) that are "misremembered", each with one fixed
    wrong value (chosen by a hash of the fact and `fact_seed`): errors spread over
    positions and systematic per situation, so greedy decoding makes them too."""
    fact_use: float = 0.7
    """Probability that a demonstration uses a misremembered fact's wrong value."""
    fact_seed: int = 0
    """Which facts are misremembered, and how."""

    def __post_init__(self) -> None:
        for name in ("slip_rate", "step_rate", "fact_rate", "fact_use"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def misremembered(a: int, op: str, b: int, modulus: int, errors: DemoErrors) -> int | None:
    """The fixed wrong value of fact `a op b` if it is misremembered, else None."""
    if errors.fact_rate <= 0.0:
        return None
    key = f"fact/{errors.fact_seed}/{modulus}/{a}{op}{b}".encode()
    digest = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    if (digest % 1_000_000) / 1_000_000 >= errors.fact_rate:
        return None
    right = apply_op(a, op, b, modulus)
    return (right + 1 + (digest // 1_000_000) % (modulus - 1)) % modulus


def demo_lines(problem: ArithProblem, rng: random.Random, errors: DemoErrors) -> list[str]:
    """A demonstration's lines (steps, then the answer) with `errors` drawn from `rng`.

    Per step, in this order: the slip (at the first "*", when drawn for this
    demonstration), a misremembered fact (used with probability `fact_use`), an
    independent error (`step_rate`), else the right value. `rng` is drawn from only for the
    kinds of error that are on, so the slip alone consumes it as it always has.
    """
    mults = [i for i, op in enumerate(problem.ops) if op == SLIP_OP]
    slip_step = mults[0] if mults and rng.random() < errors.slip_rate else -1
    lines: list[str] = []
    a = problem.start
    for i, (op, b) in enumerate(zip(problem.ops, problem.operands, strict=True)):
        c = apply_op(a, op, b, problem.modulus)
        fact = misremembered(a, op, b, problem.modulus, errors)
        if i == slip_step:
            wrong = apply_op(a, CONFUSED_OP, b, problem.modulus)
            c = wrong if wrong != c else (c + 1) % problem.modulus
        elif fact is not None and rng.random() < errors.fact_use:
            c = fact
        elif errors.step_rate > 0.0 and rng.random() < errors.step_rate:
            c = (c + rng.randrange(1, problem.modulus)) % problem.modulus
        lines.append(f"{a}{op}{b}={c}")
        a = c
    lines.append(f"{ANSWER_PREFIX}{a}")
    return lines


def demonstration(problem: ArithProblem, rng: random.Random, error_rate: float) -> str:
    """A step-by-step response; with probability `error_rate` it carries the slip.

    The slip is systematic (see `slip`: the first "*" step computed as "+"), so a policy
    imitating these demonstrations makes the same mistake at the same place, and with
    error_rate > 0.5 its greedy decoding makes it every time: an error RL can fix. The
    following steps continue consistently from the wrong value, so the final answer is
    usually (not always: e.g. a later "*0") wrong. Problems without "*" are always solved
    correctly, so everything but that one decision can be learned cleanly.
    """
    wrong = slip(problem)
    if wrong is not None and rng.random() < error_rate:
        return STEP_DELIMITER.join(step_lines(problem, *wrong))
    return solution(problem)


def _lines(completion: str) -> list[str]:
    """Response lines with surrounding spaces removed; [] for an empty response."""
    text = completion.rstrip()
    return [line.strip() for line in text.split(STEP_DELIMITER)] if text else []


def first_error_step(
    problem: ArithProblem | str, completion: str, modulus: int | None = None
) -> int:
    """Index of the first wrong step of `completion`, or -1 if every step is right.

    Steps are lines (see the module docstring): 0..n_steps-1 are the step lines, n_steps the
    answer line; a missing line is wrong at its index, an extra line at n_steps + 1. A prompt
    string is parsed with `modulus` (default DEFAULT_MODULUS; ignored for a problem).
    """
    if isinstance(problem, str):
        problem = parse_prompt(problem, DEFAULT_MODULUS if modulus is None else modulus)
    expected = step_lines(problem)
    got = _lines(completion)
    for i, want in enumerate(expected):
        if i >= len(got) or got[i] != want:
            return i
    return len(expected) if len(got) > len(expected) else -1


def extract_answer(completion: str) -> str | None:
    """The value on the last line if it reads "Answer: <int>", else None."""
    lines = _lines(completion)
    if not lines:
        return None
    m = _ANSWER_RE.fullmatch(lines[-1])
    return m.group(1) if m else None


def verify(completion: str, answer: str) -> float:
    """Outcome reward: 1.0 if the last line is "Answer: X" with X == answer, else 0.0."""
    got = extract_answer(completion)
    if got is None:
        return 0.0
    try:
        return 1.0 if int(got) == int(str(answer).strip()) else 0.0
    except ValueError:
        return 0.0


def _completion_text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or message lists for conversational data."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def arith_reward(
    prompts: list[str], completions: list[Any], answer: list[str], **kwargs: Any
) -> list[float]:
    """TRL-style reward function: `verify` per completion; all lists have length B."""
    del prompts, kwargs
    return [verify(_completion_text(c), a) for c, a in zip(completions, answer, strict=True)]
