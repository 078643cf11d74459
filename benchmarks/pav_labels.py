"""How much a PAV verifier's Monte-Carlo labels say about step correctness (built-in task).

    .venv/bin/python benchmarks/pav_labels.py VERIFIER_DIR [--out table.md]

VERIFIER_DIR is the output of launch/train_pav.py on the built-in arithmetic task: its
`mc_data.rank*.jsonl` hold, for each sampled solution, the Monte-Carlo Q^pi label of every
prefix (0 steps, 1 step, ...). Each prefix is marked clean (every step so far right) or broken
with the task's exact first-error labels, and the script reports:

- the mean label by prefix length, for clean and for broken prefixes: how far a first error
  lowers the chance of success;
- the held-out BCE of predictors fitted on half the prompts (even prompt index) and scored on
  the other half, and the reverse: a constant, the mean per prefix length, and the mean per
  (prefix length, clean). The last is what a verifier that knew only whether each step is
  right could reach; the labels' own entropy is the floor. Compare them with the trained
  verifier's validation BCE in `train_pav_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rl.pav.data import DATA_GLOB, META_FILE, SolutionRecord, read_records
from rl.pav.fitting import soft_bce
from rl.tasks.arith import DEFAULT_MODULUS, first_error_step, parse_prompt

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Label:
    """One prefix's Monte-Carlo label."""

    prompt_index: int
    length: int
    """Steps in the prefix (0 = the bare prompt)."""
    clean: bool
    """Every step of the prefix is right."""
    q: float
    """The Monte-Carlo estimate of Q^pi (fraction of continuations that succeed)."""


def prefix_clean(first_error: int, n_prefixes: int) -> list[bool]:
    """Whether prefixes of 0..n_prefixes-1 steps are clean, given the first wrong step's index
    (-1: none). A prefix of k steps holds steps 0..k-1, so it is clean iff k <= first_error."""
    return [first_error < 0 or k <= first_error for k in range(n_prefixes)]


def entropy(q: float) -> float:
    """The label's own entropy: the BCE of predicting it exactly (0 at q = 0 or 1)."""
    return 0.0 if q <= 0.0 or q >= 1.0 else soft_bce(q, q)


def fit_means(labels: Sequence[Label], key: Callable[[Label], Hashable]) -> dict[Hashable, float]:
    """Mean label per key value."""
    groups: dict[Hashable, list[float]] = defaultdict(list)
    for label in labels:
        groups[key(label)].append(label.q)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def held_out_bce(
    train: Sequence[Label], test: Sequence[Label], key: Callable[[Label], Hashable]
) -> float:
    """Mean BCE on `test` of the per-key means of `train` (the overall mean for a key value
    `train` lacks)."""
    overall = sum(x.q for x in train) / len(train)
    means = fit_means(train, key)
    return sum(soft_bce(means.get(key(x), overall), x.q) for x in test) / len(test)


PREDICTORS: dict[str, Callable[[Label], Hashable]] = {
    "constant": lambda x: 0,
    "prefix length": lambda x: x.length,
    "prefix length + clean": lambda x: (x.length, x.clean),
}


def clean_flags(
    verifier_dir: Path, records: Sequence[SolutionRecord]
) -> dict[tuple[int, int], list[bool]]:
    """{(prompt_index, sample): [H+1] whether each prefix is clean}, from the task's exact
    first error (the task's modulus from the directory's data record, the prompt decoded
    with its tokenizer)."""
    from transformers import AutoTokenizer

    meta = json.loads((verifier_dir / META_FILE).read_text())
    source = meta["data"][0]
    if source != "builtin:arith":
        raise SystemExit(f"{verifier_dir}: data {source!r} is not the built-in task")
    modulus = int((meta["data"][3] or {}).get("modulus", DEFAULT_MODULUS))
    tokenizer = AutoTokenizer.from_pretrained(str(verifier_dir))
    flags = {}
    for r in records:
        prompt = tokenizer.decode(r.prompt_ids, skip_special_tokens=True)
        first_error = first_error_step(parse_prompt(prompt, modulus), r.completion)
        flags[(r.prompt_index, r.sample)] = prefix_clean(first_error, len(r.labels))
    return flags


def read_labels(verifier_dir: Path) -> list[Label]:
    """Every prefix label of the directory's Monte-Carlo data, marked clean or broken."""
    records = read_records(verifier_dir.glob(DATA_GLOB))
    flags = clean_flags(verifier_dir, records)
    labels: list[Label] = []
    for record in records:
        clean = flags[(record.prompt_index, record.sample)]
        labels += [
            Label(record.prompt_index, k, clean[k], float(q)) for k, q in enumerate(record.labels)
        ]
    if not labels:
        raise SystemExit(f"{verifier_dir}: no Monte-Carlo records ({DATA_GLOB})")
    return labels


def render(labels: Sequence[Label], name: str) -> str:
    """The two tables as markdown."""
    lines = [f"# Monte-Carlo labels of {name}", ""]
    lines += ["| prefix steps | clean: mean label (n) | broken: mean label (n) |", "|---|---|---|"]
    for k in sorted({x.length for x in labels}):
        cells = []
        for clean in (True, False):
            qs = [x.q for x in labels if x.length == k and x.clean == clean]
            cells.append(f"{sum(qs) / len(qs):.3f} ({len(qs)})" if qs else "-")
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    lines += ["", "| held-out half | " + " | ".join(PREDICTORS) + " | floor (entropy) |"]
    lines.append("|---" * (len(PREDICTORS) + 2) + "|")
    for half in (0, 1):
        test = [x for x in labels if x.prompt_index % 2 == half]
        train = [x for x in labels if x.prompt_index % 2 != half]
        if not test or not train:
            continue  # every prompt has the same parity: nothing to hold out
        scores = [held_out_bce(train, test, key) for key in PREDICTORS.values()]
        floor = sum(entropy(x.q) for x in test) / len(test)
        parity = "even" if half == 0 else "odd"
        lines.append(
            f"| {parity} prompts ({len(test)} labels) | "
            + " | ".join(f"{s:.3f}" for s in scores)
            + f" | {floor:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("verifier_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    text = render(read_labels(args.verifier_dir), args.verifier_dir.name)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
