"""Tables and one figure from several `launch/search.py` runs (their search.csv files).

    python benchmarks/search_summary.py --runs DIR [DIR ...] [--plot OUT.png]

Prints one markdown table per run (strategy x budget: accuracy with its 95% Wilson interval
and standard error at the run's number of problems, policy tokens generated and verifier
tokens read per problem). With --plot, draws accuracy against generated tokens for all the
runs: one panel per policy (the run name's part before the first `_`), solid lines for a
learned scorer, dashed for `exact` (a name ending in `_exact`).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion p observed on n trials."""
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def table(rows: list[dict[str, str]]) -> str:
    lines = [
        "| budget | strategy | accuracy [95% CI] | s.e. | generated tok/problem "
        "| verifier tok/problem |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        p, n = float(r["accuracy"]), int(r["problems"])
        lo, hi = wilson(p, n)
        name = r["strategy"]
        if name == "beam":
            name += f" (W={r['beam_width']}, E={r['expansions']})"
        lines.append(
            f"| {r['budget']} | {name} | {100 * p:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
            f"| {100 * math.sqrt(p * (1 - p) / n):.1f} "
            f"| {float(r['generated_tokens_per_problem']):.0f} "
            f"| {float(r['verifier_tokens_per_problem']):.0f} |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, str]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(name.split("_")[0] for name in runs))
    fig, axes = plt.subplots(1, len(policies), figsize=(6 * len(policies), 4.5), sharey=True)
    axes = [axes] if len(policies) == 1 else list(axes)
    colours = {"best_of_n": "C0", "best_of_n_min": "C1", "majority": "C2", "beam": "C3"}
    for ax, policy in zip(axes, policies, strict=True):
        for name, rows in runs.items():
            if name.split("_")[0] != policy:
                continue
            exact = name.endswith("_exact")
            scorer = name.split("_", 1)[1] if "_" in name else name
            for strategy in dict.fromkeys(r["strategy"] for r in rows):
                if exact and strategy == "majority":
                    continue  # the verifier plays no part: the same curve as the other run's
                mine = [r for r in rows if r["strategy"] == strategy]
                ax.plot(
                    [float(r["generated_tokens_per_problem"]) for r in mine],
                    [float(r["accuracy"]) for r in mine],
                    marker="o",
                    linestyle="--" if exact else "-",
                    color=colours.get(strategy),
                    label=f"{strategy} ({'no verifier' if strategy == 'majority' else scorer})",
                )
        ax.set_title(f"{policy} policy")
        ax.set_xscale("log")
        ax.set_xlabel("policy tokens generated per problem")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    runs = {d.name: list(csv.DictReader(open(d / "search.csv"))) for d in args.runs}
    for name, rows in runs.items():
        print(f"\n#### {name}\n\n{table(rows)}")
    if args.plot is not None:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
