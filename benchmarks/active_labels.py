"""Active labelling for the PAV verifier (ActPRM): verifier quality against Monte-Carlo
rollouts spent, uncertainty selection vs uniform (random) labelling.

    .venv/bin/python benchmarks/active_labels.py              # 3 seeds, budgets 1/8, 1/4, 1/2
    .venv/bin/python benchmarks/active_labels.py --quick      # 1 seed, tiny model, minutes

Per seed s (the seed of everything: prompt order, solutions, rollouts, held-out split, the
selection ensemble's init):

1. A pool: `launch/train_pav.py --config configs/quickstart_pav.yaml seed=s
   pav.prompts=--prompts` labels every sampled solution (`pav_seed{s}/pool`).
2. Arms, each a `train_pav` run on that pool (`pav.label_pool`): labels are looked up, not
   rolled out again, so every arm of a seed buys from the same draws and the comparison
   isolates the selection rule from Monte-Carlo noise. For each budget f in `--fractions`:
   `uncertainty` (ActPRM: the ensemble's most uncertain solutions of each round) and
   `random` (uniform labelling), both labelling `ceil(f * n)` of each round's n candidates;
   plus `all` (f = 1: every candidate labelled, the reference). `--rules` adds
   `epistemic` (uncertainty = the heads' disagreement only), a diagnostic. The verifier is
   then trained the same way in every arm (the config's `pav.epochs`, `pav.lr`).
3. Quality of each arm's verifier: its held-out BCE on the seed's held-out prompts (the same
   for every arm of the seed, labelled in full) and its first-error F1 on the built-in
   task's exactly labelled eval-split solutions (`launch/eval_prm.py --data builtin`).

Cost is the Monte-Carlo rollouts the arm's training labels took (`n_mc` per step prefix;
held-out labels are not counted); the selection ensemble's forward/backward passes are not
rollouts and are reported apart (wall time). The headline: the rollouts `uncertainty` needs to
reach `all`'s F1, as a fraction of `all`'s rollouts (piecewise-linear between budgets, per
seed; `> f` when never reached, `<= f` when already reached at the smallest budget), next to
the same number for `random` (the control: how much of the label budget was needed at all).

Outputs in `--out` (default benchmarks/results/active_labels/): arms.csv (one row per seed
and arm), quality_vs_rollouts.png, summary.md. Runs live in `--runs-dir` and are reused when
complete, so a killed benchmark can be restarted.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import sample_efficiency as se
from benchmarks.launching import TRAIN_PAV, RunSpec, read_json, run_all
from benchmarks.sample_efficiency import prm_eval_scores

REPO = Path(__file__).resolve().parent.parent

CONFIG = "configs/quickstart_pav.yaml"
DONE_FILE = "train_pav_metrics.json"
RULES = ("uncertainty", "random", "epistemic")
"""Selection rules an arm can use: `uncertainty` (ActPRM's rule, `pav.uncertainty=max`),
`random` (uniform labelling) and `epistemic` (ensemble disagreement only, a diagnostic)."""
RULE_OVERRIDES = {
    "uncertainty": ("pav.label_select=uncertainty",),  # pav.uncertainty defaults to max
    "random": ("pav.label_select=random",),
    "epistemic": ("pav.label_select=uncertainty", "pav.uncertainty=epistemic"),
}
QUICK_OVERRIDES = (
    *(o for o in se.QUICK_OVERRIDES if o.startswith(("model.tiny.", "data.train_size"))),
    "rollout.max_new_tokens=24",
    "pav.n_mc=2",
    "pav.epochs=1",
    "pav.label_round_prompts=4",
    "pav.val_fraction=0.25",
)
CSV_COLUMNS = (
    "seed",
    "arm",
    "fraction",
    "candidates",
    "labelled",
    "mc_rollouts",
    "mc_rollouts_all",
    "val_bce",
    "val_bce_constant",
    "f1",
    "acc_error",
    "acc_correct",
    "wall_s",
)


@dataclass(frozen=True)
class Arm:
    select: str
    """`uncertainty`, `random` or `all`."""
    fraction: float

    @property
    def name(self) -> str:
        return "all" if self.select == "all" else f"{self.select}_{self.fraction:g}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (0,1,2; quick 0)")
    parser.add_argument("--fractions", default=None, help="budgets (0.125,0.25,0.5; quick 0.5)")
    parser.add_argument("--prompts", type=int, default=None, help="pool prompts (1024; quick 16)")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--runs-dir", type=Path, default=None, help="run directories")
    parser.add_argument("--cache-dir", default=None, help="start-model cache (model.cache_dir)")
    parser.add_argument("--ranks", type=int, default=2, help="deepspeed --num_gpus")
    parser.add_argument(
        "--rules", default="uncertainty,random", help=f"selection rules, of {', '.join(RULES)}"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny model and pool")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    return parser.parse_args(argv)


def floats(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    bad = [v for v in values if not 0.0 < v < 1.0]
    if bad:
        raise SystemExit(f"--fractions: each budget must be in (0, 1), got {bad}")
    return values


def arms(fractions: Sequence[float], rules: Sequence[str] = ("uncertainty", "random")) -> list[Arm]:
    """Every arm of one seed: the reference first, then each rule at each budget."""
    return [Arm("all", 1.0)] + [Arm(rule, f) for f in fractions for rule in rules]


def arm_overrides(arm: Arm, pool: Path) -> list[str]:
    rule = RULE_OVERRIDES["random" if arm.select == "all" else arm.select]
    return [f"pav.label_pool={pool}", f"pav.label_fraction={arm.fraction:g}", *rule]


def specs_for_seed(
    seed: int, seed_arms: list[Arm], base: list[str], runs: Path, ranks: int
) -> list[RunSpec]:
    """The pool's run, then each arm's (all under `runs/pav_seed{seed}/`)."""
    root = runs / f"pav_seed{seed}"
    common = ["logging.wandb=false", "logging.progress_bar=false", f"seed={seed}", *base]

    def spec(name: str, out: Path, extra: list[str]) -> RunSpec:
        return RunSpec(
            name=f"seed {seed} {name}",
            out_dir=out,
            overrides=(*common, *extra, f"pav.output_dir={out}"),
            max_steps=0,
            config=CONFIG,
            script=TRAIN_PAV,
            ranks=ranks,
            group=name,
            done_file=DONE_FILE,
        )

    pool = root / "pool"
    out = [spec("pool", pool, [])]
    out += [spec(a.name, root / a.name, arm_overrides(a, pool)) for a in seed_arms]
    return out


# ----------------------------------------------------------------------------------------------
# Reading and summarising
# ----------------------------------------------------------------------------------------------


def arm_row(
    seed: int, arm: Arm, metrics: dict[str, Any], quality: dict[str, Any] | None, wall_s: float
) -> dict[str, Any]:
    """One arms.csv row from the arm's train_pav metrics (the saved epoch's validation BCE)
    and first-error scores."""
    from rl.pav.train import kept_row  # torch-heavy; only when summarising

    active = metrics.get("active", {})
    kept = kept_row(metrics)
    quality = quality or {}
    return {
        "seed": seed,
        "arm": arm.select,
        "fraction": arm.fraction,
        "candidates": active.get("candidates"),
        "labelled": active.get("labelled"),
        "mc_rollouts": active.get("mc_rollouts"),
        "mc_rollouts_all": active.get("mc_rollouts_all_candidates"),
        "val_bce": kept.get("val_bce"),
        "val_bce_constant": metrics.get("baselines", {}).get("val_bce_constant"),
        "f1": quality.get("f1"),
        "acc_error": quality.get("acc_error"),
        "acc_correct": quality.get("acc_correct"),
        "wall_s": round(wall_s, 1),
    }


def needed_fraction(points: Sequence[tuple[float, float]], target: float) -> tuple[float, str]:
    """Where a curve first reaches `target`: points (rollout fraction, F1) sorted by
    fraction -> (fraction, kind): kind "" (interpolated between two budgets), "<=" (reached at
    the smallest budget already) or ">" (never reached: the largest budget is returned)."""
    pts = sorted(points)
    if pts[0][1] >= target:
        return pts[0][0], "<="
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if y1 >= target:
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0), ""
    return pts[-1][0], ">"


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed, the rollouts each rule needs to reach a reference arm's F1, as a fraction of
    the reference's rollouts: `needed` against `all` (every candidate labelled) for both
    rules, `needed_vs_random` for `uncertainty` against `random` at the largest budget."""
    seeds = sorted({r["seed"] for r in rows})
    rules = [rule for rule in RULES if any(r["arm"] == rule for r in rows)]
    needed: dict[str, list[dict[str, Any]]] = {rule: [] for rule in rules}
    vs_random: list[dict[str, Any]] = []
    for seed in seeds:
        mine = [r for r in rows if r["seed"] == seed and r["f1"] is not None]
        ref = [r for r in mine if r["arm"] == "all"]
        if ref and ref[0]["mc_rollouts"]:
            for sel in rules:
                found = needed_for(mine, sel, ref[0])
                if found is not None:
                    needed[sel].append({"seed": seed, **found})
        randoms = sorted((r for r in mine if r["arm"] == "random"), key=lambda r: r["fraction"])
        if randoms and randoms[-1]["mc_rollouts"]:
            found = needed_for(mine, "uncertainty", randoms[-1])
            if found is not None:
                vs_random.append({"seed": seed, **found})
    return {"seeds": seeds, "needed": needed, "needed_vs_random": vs_random}


def needed_for(rows: list[dict[str, Any]], rule: str, ref: dict[str, Any]) -> dict[str, Any] | None:
    """`needed_fraction` of `rule`'s arms (one seed's `rows`) against the `ref` row's F1."""
    pts = [(r["mc_rollouts"] / ref["mc_rollouts"], r["f1"]) for r in rows if r["arm"] == rule]
    if not pts:
        return None
    frac, kind = needed_fraction(pts, ref["f1"])
    return {"fraction": frac, "kind": kind}


def needed_line(label: str, found: list[dict[str, Any]]) -> str:
    """`- label: seed 0: 0.412, seed 1: >0.500; mean ...` (mean only when none censored)."""
    per_seed = ", ".join(f"seed {n['seed']}: {n['kind']}{n['fraction']:.3f}" for n in found)
    censored = sum(1 for n in found if n["kind"])
    if censored:
        return f"- {label}: {per_seed} ({censored} seed(s) censored, see per seed)"
    mean = mean_std([n["fraction"] for n in found]) if found else "-"
    return f"- {label}: {per_seed or '-'}; mean {mean}"


def render(rows: list[dict[str, Any]], summary: dict[str, Any], command: str) -> str:
    """summary.md: the arms table (mean ± std over seeds) and the needed fractions."""
    lines = [
        "# Active labelling for the PAV verifier (ActPRM) vs uniform labelling",
        "",
        f"Command: `{command}`",
        f"Seeds: {', '.join(map(str, summary['seeds']))}. Quality: first-error F1 on the "
        "built-in task's exactly labelled eval-split solutions (threshold 0.5) and BCE on "
        "the seed's held-out prompts. Cost: Monte-Carlo rollouts of the training labels.",
        "",
        "| arm | budget | seeds | labelled solutions | MC rollouts | F1 | held-out BCE |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["arm"], r["fraction"]) for r in rows}, key=lambda k: (-k[1], k[0]))
    for arm, frac in keys:
        mine = [r for r in rows if (r["arm"], r["fraction"]) == (arm, frac)]

        def vals(key: str, mine: list[dict[str, Any]] = mine) -> list[float]:
            return [float(r[key]) for r in mine if r[key] is not None]

        lines.append(
            f"| {arm} | {frac:g} | {len(mine)} | {mean_std(vals('labelled'))} | "
            f"{mean_std(vals('mc_rollouts'))}"
            f" | {mean_std(vals('f1'))} | {mean_std(vals('val_bce'))} |"
        )
    const = [float(r["val_bce_constant"]) for r in rows if r["val_bce_constant"] is not None]
    if const:
        lines += ["", f"Held-out BCE of a constant predictor: {mean_std(const)}."]
    lines += ["", "Rollouts needed to reach `all`'s F1, as a fraction of `all`'s rollouts:", ""]
    lines += [needed_line(sel, found) for sel, found in summary["needed"].items()]
    lines += [
        "",
        "Rollouts `uncertainty` needs to reach `random`'s F1 at the largest budget, as a "
        "fraction of that arm's rollouts:",
        "",
        needed_line("uncertainty", summary["needed_vs_random"]),
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> str:
    """F1 and held-out BCE against rollouts, per arm (each seed a point, means joined);
    returns a note when matplotlib is missing (else "")."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot."

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"uncertainty": "tab:red", "random": "tab:blue", "epistemic": "tab:green"}
    for sel, color in (*colors.items(), ("all", "black")):
        mine = [r for r in rows if r["arm"] == sel and r["f1"] is not None]
        for ax, key in zip(axes, ("f1", "val_bce"), strict=True):
            xs = [r["mc_rollouts"] for r in mine]
            ax.scatter(xs, [r[key] for r in mine], color=color, s=12, alpha=0.6)
            fracs = sorted({r["fraction"] for r in mine})
            mx = [
                statistics.mean(r["mc_rollouts"] for r in mine if r["fraction"] == f) for f in fracs
            ]
            my = [statistics.mean(r[key] for r in mine if r["fraction"] == f) for f in fracs]
            ax.plot(mx, my, "-o", color=color, label=sel)
    for ax, title in zip(axes, ("first-error F1 (exact labels)", "held-out BCE"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("Monte-Carlo rollouts of the training labels")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    fractions = floats(args.fractions or ("0.5" if args.quick else "0.125,0.25,0.5"))
    prompts = args.prompts or (16 if args.quick else 1024)
    name = "active_labels_quick" if args.quick else "active_labels"
    runs = (args.runs_dir or REPO / "benchmarks" / "runs" / name).resolve()
    out = (args.out or REPO / "benchmarks" / "results" / name).resolve()
    base = [f"pav.prompts={prompts}", *(QUICK_OVERRIDES if args.quick else ())]
    if args.cache_dir:
        base.append(f"model.cache_dir={Path(args.cache_dir).resolve()}")
    base += args.overrides
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise SystemExit(f"--rules: unknown {unknown}; valid: {', '.join(RULES)}")
    seed_arms = arms(fractions, rules)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    for seed in seeds:
        specs = specs_for_seed(seed, seed_arms, base, runs, args.ranks)
        results = run_all(specs, desc=f"active labels, seed {seed}")
        if not results[0].ok:
            failed.append(f"seed {seed} pool: {results[0].status}: {results[0].reason}")
            continue
        eval_overrides = [o for o in base if not o.startswith("pav.")]
        for arm, result in zip(seed_arms, results[1:], strict=True):
            if not result.ok:
                failed.append(f"{result.spec.name}: {result.status}: {result.reason}")
                continue
            metrics = read_json(result.spec.out_dir / DONE_FILE)
            quality = prm_eval_scores(result.spec.out_dir, CONFIG, eval_overrides)
            rows.append(arm_row(seed, arm, metrics, quality, result.wall_s))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "arms.csv")
    command = "python benchmarks/active_labels.py " + " ".join(argv)
    text = render(rows, summarize(rows), command.strip())
    if failed:
        text += "\nNot run:\n" + "".join(f"- {line}\n" for line in failed)
    if rows:
        note = plot(rows, out / "quality_vs_rollouts.png")
        text += f"\n{note}\n" if note else ""
    (out / "summary.md").write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
