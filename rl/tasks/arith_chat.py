"""The built-in arithmetic task written the way chat / GSM8K data is: a question in words,
a GSM8K-style reference (`answer` = the step lines, then `#### N`), and chat responses that
end with `\\boxed{N}`.

    question:  "Compute 3 +4 *2 -6 from left to right, modulo 7."
    answer:    "3+4=0\\n0*2=0\\n0-6=1\\n#### 1"            (the JSONL's reference column)
    response:  "3+4=0\\n0*2=0\\n0-6=1\\nThe answer is \\\\boxed{1}."

The step lines are those of `rl.tasks.arith` (same problems, same splits, same systematic
slip in the demonstrations), so a chat response's first error can still be located exactly:
`as_arith_completion` maps it back to the plain task's format.

Pure python: no torch import.
"""

from __future__ import annotations

import random
import re

from rl.tasks.arith import (
    STEP_DELIMITER,
    ArithConfig,
    ArithProblem,
    sample_problems,
    slip,
    step_lines,
)

GOLD_MARK = "#### "
"""Precedes the final answer in a GSM8K-style reference."""

_BOXED_LINE = re.compile(r"The answer is \\boxed\{(-?\d+)\}\.?")


def question(problem: ArithProblem) -> str:
    """The problem as a question in words."""
    return f"Compute {problem.prompt} from left to right, modulo {problem.modulus}."


def reference(problem: ArithProblem) -> str:
    """The GSM8K-style reference: the correct step lines, then `#### N`."""
    lines = step_lines(problem)
    return STEP_DELIMITER.join(lines[:-1] + [f"{GOLD_MARK}{problem.answer}"])


def chat_response(problem: ArithProblem, wrong_step: int = -1, wrong_value: int = 0) -> str:
    """A chat response: the step lines (with an optional slip, see `step_lines`), then
    "The answer is \\boxed{N}." for the value the lines arrive at."""
    lines = step_lines(problem, wrong_step, wrong_value)
    final = lines[-1].split()[-1]  # "Answer: N" -> "N"
    return STEP_DELIMITER.join(lines[:-1] + [f"The answer is \\boxed{{{final}}}."])


def chat_demonstration(problem: ArithProblem, rng: random.Random, error_rate: float) -> str:
    """`chat_response`, carrying the task's systematic slip with probability `error_rate`
    (the same draw as `rl.tasks.arith.demonstration`)."""
    wrong = slip(problem)
    if wrong is not None and rng.random() < error_rate:
        return chat_response(problem, *wrong)
    return chat_response(problem)


def gsm8k_rows(split: str, n: int, cfg: ArithConfig, seed: int) -> list[dict[str, str]]:
    """`n` rows `{"question", "answer"}` of `split`: the problems of
    `rl.tasks.arith.sample_problems(split, n, cfg, seed)`, in the same order."""
    return [
        {"question": question(p), "answer": reference(p)}
        for p in sample_problems(split, n, cfg, seed)
    ]


def as_arith_completion(response: str) -> str:
    """A chat response in the plain task's format (its boxed line read as "Answer: N"), so
    `rl.tasks.arith.first_error_step` can label it."""
    lines = response.rstrip().split(STEP_DELIMITER)
    match = _BOXED_LINE.fullmatch(lines[-1].strip()) if lines else None
    if match is not None:
        lines[-1] = f"Answer: {match.group(1)}"
    return STEP_DELIMITER.join(lines)
