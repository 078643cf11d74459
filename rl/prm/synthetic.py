"""Synthetic wrong steps for PRM training (`prm.synthetic_negatives`), bought from no teacher.

A PRM trained only on the start policy's solutions has never seen the text an RL policy
drifts to when it games the PRM (repeated fragments, steps that belong to another problem,
scrambled tokens) and may score it as right. Each synthetic example copies a labelled
solution up to one of its right steps `h`, replaces step `h` by a corrupted version and ends
there, labelled right before `h` and wrong at `h` (the prefix convention; nothing after it).

Corruptions, chosen uniformly (each must change the step):
- `repeat`: a prefix of the step repeated 2-3 times ("6+8=" -> "6+8=6+8=6+8=");
- `foreign`: a step of a solution to another prompt;
- `scramble`: the step's characters shuffled.

A corrupted step is almost always wrong; a `foreign` one can be right by chance (the same
step text in another problem), so these labels carry a little noise. Pure Python.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from rl.prm.data import COST_KEYS, StepExample

CORRUPTIONS: tuple[str, ...] = ("repeat", "foreign", "scramble")


def corrupt_step(
    step: str, kind: str, rng: random.Random, foreign_steps: Sequence[str]
) -> str | None:
    """`step` corrupted by `kind`, or None when this kind cannot change it."""
    if kind == "repeat":
        prefix = step[: rng.randint(1, len(step))] if step else ""
        out = prefix * rng.randint(2, 3)
    elif kind == "foreign":
        others = [s for s in foreign_steps if s != step]
        out = rng.choice(others) if others else step
    elif kind == "scramble":
        chars = list(step)
        rng.shuffle(chars)
        out = "".join(chars)
    else:
        raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
    return out if out and out != step else None


def synthetic_negatives(
    examples: Sequence[StepExample], share: float, seed: int
) -> list[StepExample]:
    """About `round(share * len(examples))` synthetic examples (see the module doc), one per
    chosen solution whose first step is right; each records its corruption in
    `extra["synthetic"]` and costs nothing."""
    rng = random.Random(seed)
    usable = [i for i, e in enumerate(examples) if e.labels and e.labels[0]]
    chosen = sorted(rng.sample(usable, min(len(usable), round(share * len(examples)))))
    every_step = [(e.prompt, step) for e in examples for step in e.completions]
    out = []
    for i in chosen:
        ex = examples[i]
        right = next((h for h, good in enumerate(ex.labels) if not good), len(ex.labels))
        h = rng.randrange(right)
        drawn = rng.sample(every_step, min(len(every_step), 32))
        foreign = [step for prompt, step in drawn if prompt != ex.prompt]
        for kind in rng.sample(CORRUPTIONS, len(CORRUPTIONS)):  # the first that changes it
            step = corrupt_step(ex.completions[h], kind, rng, foreign)
            if step is not None:
                out.append(
                    replace(
                        ex,
                        completions=[*ex.completions[:h], step],
                        labels=[True] * h + [False],
                        label_values=None,
                        cost=dict.fromkeys(COST_KEYS, 0),
                        extra={**ex.extra, "synthetic": kind},
                    )
                )
                break
    return out
