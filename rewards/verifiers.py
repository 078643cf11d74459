"""Built-in outcome verifiers, registered in `REWARD_FUNCTIONS`.

* "arith": the built-in arithmetic task's verifier (`rl.tasks.arith.arith_reward`).
* "exact_match": 1.0 if the completion's final answer equals the gold `answer` after
  normalisation, else 0.0. See `extract_final_answer` and `normalize_answer`.
* "math_verify": 1.0 if `math_verify.verify(parse(gold), parse(completion))`, else 0.0.

All take `answer=[N]` (the gold answers, aligned with the completions) and return `[N]` floats.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from rewards.base import REWARD_FUNCTIONS

# ----------------------------------------------------------------------------------------------
# arith
# ----------------------------------------------------------------------------------------------


@REWARD_FUNCTIONS.register("arith")
def arith(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """The built-in `builtin:arith` task's verifier (needs `answer=[N]`)."""
    from rl.tasks.arith import arith_reward  # lazy: the task module is optional at import time

    return [float(r) for r in arith_reward(prompts, completions, **columns)]


# ----------------------------------------------------------------------------------------------
# exact_match
# ----------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARK = re.compile(r"(?:answer\s*(?:is\s*)?[:：]|answer\s+is\b|####)", re.IGNORECASE)
_GOLD_MARK = re.compile(r"####")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces; None if absent
    or unbalanced."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def extract_final_answer(text: str) -> str:
    """The completion's final answer, tried in order:

    1. the content of the last `\\boxed{...}`;
    2. the rest of the line after the last "Answer:" / "answer is" / "####" (case-insensitive);
    3. the last non-empty line.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        rest = text[marks[-1].end() :].strip()
        return rest.splitlines()[0] if rest else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def extract_gold_answer(gold: str) -> str:
    """The gold answer: `\\boxed{...}` content or the text after "####" (GSM8K style) if present,
    else the whole string."""
    boxed = last_boxed(gold)
    if boxed is not None:
        return boxed
    marks = list(_GOLD_MARK.finditer(gold))
    if marks:
        rest = gold[marks[-1].end() :].strip()
        return rest.splitlines()[0] if rest else ""
    return gold


def normalize_answer(text: str) -> str:
    """Strip whitespace, `$`, `**`, a trailing period; collapse spaces; casefold; drop thousands
    separators ("1,000" -> "1000")."""
    s = text.strip()
    prev = None
    while s != prev:
        prev = s
        s = s.strip().strip("$").strip()
        if s.startswith("**") and s.endswith("**") and len(s) >= 4:
            s = s[2:-2]
        s = s.rstrip(".").strip()
    s = _THOUSANDS.sub("", s)
    return " ".join(s.split()).casefold()


@REWARD_FUNCTIONS.register("exact_match")
def exact_match(
    prompts: list[str], completions: list[str], answer: Sequence[Any], **_: Any
) -> list[float]:
    """1.0 where `normalize_answer(extract_final_answer(completion))` equals the normalised gold."""
    return [
        float(
            normalize_answer(extract_final_answer(c))
            == normalize_answer(extract_gold_answer(str(a)))
        )
        for c, a in zip(completions, answer, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# math_verify
# ----------------------------------------------------------------------------------------------

# math_verify's timeouts use signal.alarm, which only works on the main thread; elsewhere we run
# without its timeout (it would otherwise log an error and score everything 0).
_TIMEOUT_S = 5


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_gold(gold: str) -> list[Any]:
    """`math_verify.parse` of a gold answer. Bare LaTeX like `\\sqrt{2}` is not found by
    math_verify's extractors without delimiters, so it is retried wrapped in `$...$`."""
    from math_verify import parse

    parsed = parse(gold, parsing_timeout=_timeout())
    if not parsed and "$" not in gold:
        parsed = parse(f"${gold}$", parsing_timeout=_timeout())
    return list(parsed)


@REWARD_FUNCTIONS.register("math_verify")
def math_verify_reward(
    prompts: list[str], completions: list[str], answer: Sequence[Any], **_: Any
) -> list[float]:
    """1.0 where math_verify judges the completion's answer equal to the gold, else 0.0.

    Gold answers are parsed once per distinct value (a group shares one): the text after a
    GSM8K-style "#### " or the content of the last `\\boxed{}` when present, else the whole
    string. An unparseable gold or completion scores 0.0.
    """
    from math_verify import parse, verify

    gold_cache: dict[str, list[Any]] = {}
    out: list[float] = []
    for completion, gold in zip(completions, answer, strict=True):
        key = str(gold)
        if key not in gold_cache:  # a GSM8K rationale's "#### N" or a \boxed{} answer first
            gold_cache[key] = parse_gold(extract_gold_answer(key))
        gold_parsed = gold_cache[key]
        if not gold_parsed:
            out.append(0.0)
            continue
        pred = parse(completion, parsing_timeout=_timeout())
        ok = bool(pred) and verify(gold_parsed, pred, timeout_seconds=_timeout())
        out.append(1.0 if ok else 0.0)
    return out
