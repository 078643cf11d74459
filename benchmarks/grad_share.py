"""Measure step credit's share of the policy gradient on finished benchmark runs.

    .venv/bin/python benchmarks/grad_share.py RUN_DIR [RUN_DIR ...] [--out table.md]

Each RUN_DIR is a finished sample-efficiency run (it holds `benchmark_run.json`, written by
benchmarks/launching.py, and needs `logging.credit_diagnostics=true` among its overrides).
The run is launched again, with the same command plus `logging.credit_grad_share=true`, into
`RUN_DIR/grad_share/`. The measurement does not change the update, so the re-run must
reproduce the original's rewards, losses and accuracies step for step: the script checks
that, and fails if they differ. It then writes one row per run: the means over training
steps of `diag/step_credit_share` (advantage norms, the proxy),
`diag/step_credit_grad_share` (measured) and `diag/step_outcome_grad_cos`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from benchmarks.launching import (
    SPEC_FILE,
    RunSpec,
    read_json,
    read_jsonl,
    run_all,
    step_rows,
)

REPO = Path(__file__).resolve().parent.parent

FLAG = "logging.credit_grad_share=true"
COMPARED = ("reward/outcome_mean", "train/loss", "train/grad_norm", "eval/accuracy")
"""Metrics that must match between a run and its re-run (the update is unchanged)."""


def remeasure_spec(run_dir: Path) -> RunSpec:
    """The spec that re-runs `run_dir`'s command with the gradient share measured."""
    record = read_json(run_dir / SPEC_FILE)
    overrides = tuple(record["overrides"])
    if "logging.credit_diagnostics=true" not in overrides:
        raise ValueError(f"{run_dir}: its run has no logging.credit_diagnostics=true")
    steps = [o for o in overrides if o.startswith("trainer.max_steps=")]
    if not steps:
        raise ValueError(f"{run_dir}: {SPEC_FILE} sets no trainer.max_steps")
    return RunSpec(
        name=run_dir.as_posix(),
        out_dir=run_dir.resolve() / "grad_share",
        overrides=(*overrides, FLAG),
        max_steps=int(steps[-1].partition("=")[2]),
        config=record["config"],
        script=record["script"],
        ranks=int(record["ranks"]),
    )


def mismatches(a: list[dict[str, Any]], b: list[dict[str, Any]], tol: float = 1e-6) -> list[str]:
    """`COMPARED` metrics that differ between two runs' rows, as 'step N key: x vs y'."""
    out = [] if len(a) == len(b) else [f"{len(a)} rows vs {len(b)}"]
    for row_a, row_b in zip(a, b, strict=False):
        for key in COMPARED:
            x, y = row_a.get(key), row_b.get(key)
            if x is None and y is None:
                continue
            if x is None or y is None or abs(float(x) - float(y)) > tol * max(1.0, abs(x)):
                out.append(f"step {row_a.get('step')} {key}: {x} vs {y}")
    return out


def mean_of(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of `key` over the rows that have a finite value (NaN when none do)."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """The markdown table of per-run means."""
    lines = [
        "| run | step-credit share of the advantage (proxy) | measured share of the gradient "
        "| cosine(step gradient, outcome gradient) |",
        "|---|---|---|---|",
    ]
    for name, means in rows:
        lines.append(
            f"| {name} | {means['proxy']:.1%} | {means['grad']:.1%} | {means['cos']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    specs = [remeasure_spec(d) for d in args.run_dirs]
    results = run_all(specs, desc="grad share")
    rows = []
    for run_dir, result in zip(args.run_dirs, results, strict=True):
        if not result.ok:
            raise SystemExit(f"{run_dir}: re-run {result.status}: {result.reason}")
        original = step_rows(read_jsonl(run_dir / "metrics.jsonl"))
        measured = step_rows(read_jsonl(result.spec.out_dir / "metrics.jsonl"))
        bad = mismatches(original, measured)
        if bad:
            raise SystemExit(f"{run_dir}: the re-run differs: {'; '.join(bad[:5])}")
        means = {
            "proxy": mean_of(measured, "diag/step_credit_share"),
            "grad": mean_of(measured, "diag/step_credit_grad_share"),
            "cos": mean_of(measured, "diag/step_outcome_grad_cos"),
        }
        rows.append((run_dir.as_posix(), means))
    text = table(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
