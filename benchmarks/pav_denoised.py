"""Rewrite a PAV verifier's training labels without their Monte-Carlo noise (built-in task).

    .venv/bin/python benchmarks/pav_denoised.py VERIFIER_DIR OUT_DIR [--targets length_clean]
        [--val-fraction 0.1] [--seed 0]

A diagnosis, not a method: it asks whether the verifier fails to learn the step signal because
its labels are noisy (few continuations per prefix) or because it cannot learn to tell a
broken prefix from a clean one from this many solutions at all. VERIFIER_DIR holds the
`mc_data.*` of a `launch/train_pav.py` run; OUT_DIR gets the same solutions with new labels on
the training prompts:

- `length_clean`: every prefix label but the last becomes the mean Monte-Carlo label of its
  (prefix length, clean) group over the training prompts: what infinitely many continuations
  would give if a prefix's value depended only on its length and on whether it is still right;
- `clean`: 1 for a clean prefix, 0 for a broken one (the sharpest signal, not a value), on
  the held-out prompts too: the refit's validation BCE and accuracy then score how well it
  tells clean from broken prefixes of prompts it has not seen.

The last label (the solution's own verifier outcome) is exact and kept. With `length_clean`
the held-out prompts (the split `launch/train_pav.py` makes from `pav.val_fraction` and
`seed`) keep their Monte-Carlo labels, so a refit on OUT_DIR (`launch/train_pav.py` with the
verifier's own overrides and `pav.output_dir=OUT_DIR`: the data is complete, so only the
verifier trains) reports a validation BCE comparable with the original verifier's and the
constant's.
Clean or broken comes from the task's exact first-error labels (as in `pav_labels.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from benchmarks.pav_labels import clean_flags
from rl.data.prompts import val_prompt_set
from rl.pav.data import DATA_GLOB, META_FILE, SolutionRecord, append_records, read_records

REPO = Path(__file__).resolve().parent.parent

TARGETS = ("length_clean", "clean")

GroupKey = tuple[int, bool]
"""(prefix length in steps, clean)."""


def group_means(
    records: Sequence[SolutionRecord], clean: dict[tuple[int, int], list[bool]]
) -> dict[GroupKey, float]:
    """Mean label per (prefix length, clean) over every label but each solution's last.
    `clean[(prompt_index, sample)]`: [H+1] whether each prefix is clean."""
    groups: dict[GroupKey, list[float]] = defaultdict(list)
    for r in records:
        flags = clean[(r.prompt_index, r.sample)]
        for k, q in enumerate(r.labels[:-1]):
            groups[(k, flags[k])].append(q)
    return {key: sum(qs) / len(qs) for key, qs in groups.items()}


def new_labels(
    labels: Sequence[float], flags: Sequence[bool], means: dict[GroupKey, float], targets: str
) -> list[float]:
    """[H+1] the rewritten labels of one solution (the last, its outcome, kept)."""
    if targets == "length_clean":
        head = [means[(k, flags[k])] for k in range(len(labels) - 1)]
    elif targets == "clean":
        head = [1.0 if flags[k] else 0.0 for k in range(len(labels) - 1)]
    else:
        raise ValueError(f"--targets: {targets!r} is not one of {', '.join(TARGETS)}")
    return head + [float(labels[-1])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("verifier_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--targets", choices=TARGETS, default="length_clean")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="pav.val_fraction")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed")
    args = parser.parse_args(argv)
    if list(args.out_dir.glob(DATA_GLOB)):
        raise SystemExit(f"{args.out_dir}: already holds Monte-Carlo data; pick a new directory")
    records = [r for r in read_records(args.verifier_dir.glob(DATA_GLOB)) if r.labels]
    if not records:
        raise SystemExit(f"{args.verifier_dir}: no Monte-Carlo records ({DATA_GLOB})")
    val = val_prompt_set({r.prompt_index for r in records}, args.val_fraction, args.seed)
    train = [r for r in records if r.prompt_index not in val]
    flags = clean_flags(args.verifier_dir, records)
    means = group_means(train, flags)
    keep_val = args.targets == "length_clean"
    rewritten = [
        r
        if keep_val and r.prompt_index in val
        else dataclasses.replace(
            r, labels=new_labels(r.labels, flags[(r.prompt_index, r.sample)], means, args.targets)
        )
        for r in records
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.verifier_dir / META_FILE, args.out_dir / META_FILE)
    append_records(args.out_dir / "mc_data.rank0.jsonl", rewritten)
    n_val = len(records) - len(train)
    print(
        f"{len(train)} training solutions relabelled ({args.targets}), {n_val} held-out ones "
        f"{'kept' if keep_val else 'relabelled'}; Monte-Carlo group means:"
    )
    for (k, is_clean), q in sorted(means.items()):
        print(f"  prefix {k} {'clean' if is_clean else 'broken'}: {q:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
