"""Learned-PRM benchmark, part 1: PRM quality against the number of teacher labels.

    .venv/bin/python benchmarks/learned_prm.py data  [--regime NAME] [--pool-prompts 512] ...
    .venv/bin/python benchmarks/learned_prm.py curve [--regime NAME] [--budgets 0.01,...] \\
        [--selections uniform,uncertainty] [--seeds 3] [prm.KEY=VALUE ...]
    .venv/bin/python benchmarks/learned_prm.py summary

`data` samples solutions from a start policy (configs/quickstart.yaml's, or a regime's from
benchmarks/regimes.py) with `launch/make_prm_data.py --labeler exact` under
`deepspeed --num_gpus 2`, on three prompt splits: the **pool** (train split: the labels a
teacher could sell), the **validation** set (validation split: picks each PRM's epoch) and
the **test** set (eval split: every number reported). The `exact` labels stand for a strong
teacher or judge; each one bought counts as one teacher label.

`curve` trains a PRM from the start policy (`rl.prm.active.train_with_budget`, one process)
for every selection rule (`uniform`: a random draw; `uncertainty`: ActPRM's ensemble ranking),
budget (a share of the pool's solutions) and seed, then scores it on the test set: step AUC
and ProcessBench first-error F1 at p = 0.5 (`rl.prm.fitting.prm_scores`) and at the threshold
that is best on the validation set. `--selections shuffled` trains the negative control: the
pool's and validation set's step labels permuted across all steps (the RL benchmark's
`prm_shuffled` reads it); its test numbers are on the true labels. One JSON line per
run in `<results>/<name>/label_curve.jsonl`; a rerun skips the runs done, so a killed curve
resumes. PRM settings (`prm.epochs`, `prm.lr`, ...) are `prm.KEY=VALUE` overrides and are
recorded with each row: choose them on the validation numbers (`val_f1` in each row), never
on the test set. With a fixed `prm.epochs` a small budget also gets few optimizer steps;
`--steps-matched` gives every budget about the full pool's steps (`budget_prm`), and with
`prm.keep=best_f1` each PRM keeps the epoch with the best validation F1.

`summary` writes `<results>/summary.json` (`label_curve` rows: `selection`, `budget_frac`,
`teacher_labels`, `seed`, `f1`, `auc`, plus the setup; `rl` rows from each
`<setup>/rl/summary.json` of benchmarks/sample_efficiency.py; `search` rows from each
`<setup>/search/<policy>_<scorer>/search.csv` of launch/search.py) and `label_curve.md`:
the mean and spread over seeds per budget, and the ActPRM fraction (the smallest budget at
which active selection matches uniform selection's full-pool F1, as a share of the pool's
labels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.launching import free_port, prebuild_start_model, start_model_line

REPO = Path(__file__).resolve().parent.parent

CONFIG = "configs/quickstart.yaml"
RESULTS = REPO / "benchmarks" / "results" / "learned_prm"
RUNS = REPO / "benchmarks" / "runs" / "learned_prm"
SPLITS: dict[str, str] = {"pool": "train", "val": "validation", "test": "eval"}
"""Dataset role -> prompt split of the task."""
BUDGETS = (0.01, 0.03, 0.1, 0.3, 1.0)
SELECTIONS = ("uniform", "uncertainty")
CONTROL = "shuffled"
"""The negative control's selection name: uniform selection on the pool's (and the validation
set's) labels permuted across all steps, so the PRM sees the label rate but no step truth."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("data", "curve", "summary"))
    parser.add_argument("--regime", default=None, help="a benchmarks/regimes.py regime")
    parser.add_argument("--pool-prompts", type=int, default=512)
    parser.add_argument("--val-prompts", type=int, default=64)
    parser.add_argument("--test-prompts", type=int, default=256)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--selections", default=",".join(SELECTIONS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--runs-dir", type=Path, default=RUNS)
    parser.add_argument(
        "--steps-matched",
        action="store_true",
        help="scale each budget's epochs (and validation interval) by 1/budget, so every PRM "
        "takes about as many optimizer steps as the full pool's",
    )
    parser.add_argument("overrides", nargs="*", help="prm.KEY=VALUE settings of the PRM")
    return parser.parse_intermixed_args(argv)


def regime_overrides(name: str | None) -> list[str]:
    """The regime's task and start-model overrides (none: the quickstart's task)."""
    if name is None:
        return []
    from benchmarks.regimes import regime

    return list(regime(name).overrides)


def setup_name(args: argparse.Namespace) -> str:
    return args.regime or "quickstart"


def rel(path: Path) -> str:
    """`path` relative to the repository when inside it (logs name no machine's paths)."""
    full = path.resolve()
    return str(full.relative_to(REPO)) if full.is_relative_to(REPO) else str(path)


def data_dir(args: argparse.Namespace, role: str) -> Path:
    return args.runs_dir / setup_name(args) / "data" / role


def make_data(args: argparse.Namespace) -> None:
    """Sample and exactly label the pool, validation and test solutions (resumable)."""
    overrides = regime_overrides(args.regime)
    prebuild_start_model(CONFIG, overrides)  # built once, outside the timed launches
    prompts = {"pool": args.pool_prompts, "val": args.val_prompts, "test": args.test_prompts}
    script = Path(sys.executable).parent / "deepspeed"
    for role, split in SPLITS.items():
        out = data_dir(args, role)
        cmd = [str(script), "--num_gpus", "2", "--master_port", str(free_port())]
        cmd += ["launch/make_prm_data.py", "--config", CONFIG, "--labeler", "exact"]
        cmd += ["--out", rel(out), "--split", split, "--prompts", str(prompts[role])]
        cmd += ["--samples-per-prompt", str(args.samples_per_prompt), *overrides]
        cmd += ["logging.progress_bar=false"]
        print(f"data {role}: {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)


def parse_prm_overrides(overrides: list[str]) -> dict[str, Any]:
    """`prm.KEY=VALUE` -> {KEY: value} (YAML scalars); ValueError naming anything else."""
    import yaml

    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("prm."):
            raise ValueError(f"override {item!r}: expected prm.KEY=VALUE")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.removeprefix("prm.")] = parsed
    return out


def shuffle_labels(examples: list[Any], seed: int) -> list[Any]:
    """`examples` with every step label permuted across the whole set (each solution keeps its
    number of steps; the share of good steps is unchanged)."""
    import random
    from dataclasses import replace

    labels = [label for e in examples for label in e.labels]
    random.Random(seed).shuffle(labels)
    out, at = [], 0
    for e in examples:
        out.append(replace(e, labels=labels[at : at + len(e.labels)]))
        at += len(e.labels)
    return out


def control_data(
    pool: list[Any], val: list[Any], prm: Any, seed: int
) -> tuple[list[Any], list[Any]]:
    """The negative control's (pool, validation): cut after the first error when the PRM
    settings drop those steps (so the control buys the same labels), then every label
    permuted across the set."""
    from rl.prm.data import until_first_error

    if prm.after_first_error == "drop":
        pool, val = [until_first_error(e) for e in pool], [until_first_error(e) for e in val]
    return shuffle_labels(pool, seed), shuffle_labels(val, seed + 1)


def budget_prm(prm: Any, budget: float, steps_matched: bool) -> Any:
    """The PRM settings of one budget: as given, or with `steps_matched` `prm.epochs / budget`
    epochs validated every `1 / budget` epochs (rounded), so a small budget gets as many
    optimizer steps and validations as the full pool instead of a few steps (with a fixed
    epoch count a 1% budget trains 1% of the steps); `prm.keep` then picks among them."""
    from dataclasses import replace

    if not steps_matched or budget >= 1.0:
        return prm
    scale = 1.0 / budget
    return replace(
        prm,
        epochs=max(1, round(prm.epochs * scale)),
        validate_every=max(1, round(prm.validate_every * scale)),
    )


def prm_dir_name(key: tuple[str, float, int, str]) -> str:
    """`<selection>_<budget>_<seed>`, plus a digest of the PRM settings when any are set (so
    PRMs of different settings do not overwrite each other)."""
    import hashlib

    selection, budget, seed, settings = key
    name = f"{selection}_{budget}_{seed}"
    if settings != "{}":
        name += "_" + hashlib.sha256(settings.encode()).hexdigest()[:8]
    return name


def run_key(row: dict[str, Any]) -> tuple[str, float, int, str]:
    return (row["selection"], float(row["budget_frac"]), int(row["seed"]), row["settings"])


def curve(args: argparse.Namespace) -> None:
    """Train and test one PRM per (selection, budget, seed); append rows as they finish."""
    from dataclasses import replace

    from rl.config import PRMConfig
    from rl.eval.prm import best_threshold
    from rl.prm.active import train_with_budget
    from rl.prm.data import read_step_dataset
    from rl.prm.fitting import first_bad, prm_scores
    from rl.prm.model import load_prm, step_probabilities

    start = prebuild_start_model(CONFIG, regime_overrides(args.regime))
    assert start is not None
    pool, val, test = (read_step_dataset(data_dir(args, r)) for r in ("pool", "val", "test"))
    settings = parse_prm_overrides(args.overrides)
    prm = replace(PRMConfig(), **settings)
    recorded = {**settings, "steps_matched": True} if args.steps_matched else settings
    settings_key = json.dumps(recorded, sort_keys=True)
    out = args.results / setup_name(args)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "label_curve.jsonl"
    done = {run_key(r) for r in read_rows(rows_file)}
    budgets = [float(b) for b in args.budgets.split(",")]
    for selection in args.selections.split(","):
        for budget in budgets:
            for seed in range(args.seeds):
                key = (selection, budget, seed, settings_key)
                if key in done:
                    continue
                t0 = time.perf_counter()
                prm_dir = args.runs_dir / setup_name(args) / "prms" / prm_dir_name(key)
                control = selection == CONTROL
                train_pool, train_val = pool, val
                run_prm = budget_prm(prm, budget, args.steps_matched)
                if control:  # cut first (the same labels bought), then permute the labels
                    train_pool, train_val = control_data(pool, val, prm, seed)
                    run_prm = replace(run_prm, after_first_error="keep")
                fit = train_with_budget(
                    train_pool,
                    budget,
                    "uniform" if control else selection,
                    seed,
                    model_path=start,
                    val_examples=train_val,
                    prm=run_prm,
                    out_dir=prm_dir,
                )
                model, tokenizer = load_prm(prm_dir)
                probs = step_probabilities(
                    model, tokenizer, [e.prompt for e in test], [e.completions for e in test]
                )
                scores = prm_scores(probs, [e.labels for e in test])
                # the first-error threshold chosen on the validation set, applied to the test set
                val_probs = step_probabilities(
                    model, tokenizer, [e.prompt for e in val], [e.completions for e in val]
                )
                val_labels = train_val
                threshold, _ = best_threshold(val_probs, [first_bad(e.labels) for e in val_labels])
                tuned = prm_scores(probs, [e.labels for e in test], threshold)
                row = {
                    "selection": selection,
                    "budget_frac": budget,
                    "seed": seed,
                    "settings": settings_key,
                    "teacher_labels": fit["teacher_labels"],
                    "labelled_solutions": fit["labelled_solutions"],
                    "skipped_solutions": fit["skipped_solutions"],
                    "f1": scores["f1"],
                    "auc": scores["auc"],
                    "acc_error": scores["acc_error"],
                    "acc_correct": scores["acc_correct"],
                    "test_bce": scores["bce"],
                    "threshold": threshold,
                    "f1_tuned": tuned["f1"],
                    "acc_error_tuned": tuned["acc_error"],
                    "acc_correct_tuned": tuned["acc_correct"],
                    "val_f1": fit["f1"],
                    "val_auc": fit["auc"],
                    "val_loss": fit["val_loss"],
                    "seconds": round(time.perf_counter() - t0, 1),
                    "start_model": start_model_line(start),
                }
                with rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                nan = float("nan")  # a score with no defined value (e.g. no right solution)
                print(
                    f"{selection:11s} budget {budget:<5} seed {seed}: "
                    f"{row['teacher_labels']} labels, test F1 {row['f1']:.3f} "
                    f"AUC {row['auc'] or nan:.3f} (val F1 {row['val_f1'] or nan:.3f}); "
                    f"at the validation threshold {threshold:.2f}: F1 {row['f1_tuned']:.3f}, "
                    f"{row['seconds']} s",
                    flush=True,
                )


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def actprm_fraction(rows: list[dict[str, Any]]) -> float | None:
    """Smallest budget at which `uncertainty`'s mean F1 reaches `uniform`'s at the full pool
    (None when it never does, or a curve is missing)."""

    def mean_f1(selection: str, budget: float) -> float | None:
        fs = [r["f1"] for r in rows if r["selection"] == selection and r["budget_frac"] == budget]
        return statistics.fmean(fs) if fs else None

    full = mean_f1("uniform", 1.0)
    if full is None:
        return None
    for budget in sorted({r["budget_frac"] for r in rows if r["selection"] == "uncertainty"}):
        f1 = mean_f1("uncertainty", budget)
        if f1 is not None and f1 >= full:
            return float(budget)
    return None


def prm_labels_by_dir(results: Path) -> dict[str, int]:
    """Teacher labels of every PRM the label curves trained, by its directory name."""
    labels: dict[str, int] = {}
    for rows_file in results.glob("*/label_curve.jsonl"):
        for row in read_rows(rows_file):
            labels[prm_dir_name(run_key(row))] = int(row["teacher_labels"])
    return labels


def rl_rows(results: Path) -> list[dict[str, Any]]:
    """summary.json's `rl` rows from each `<setup>/rl*/summary.json` that
    benchmarks/sample_efficiency.py wrote (`study`: that directory's name, e.g. `rl` or
    `rl_located`): one per method, with the teacher labels of the PRM it read (`--prm` /
    `--prm-control` in its command; None for methods without one)."""
    labels = prm_labels_by_dir(results)
    rows: list[dict[str, Any]] = []
    for file in sorted(results.glob("*/rl*/summary.json")):
        report = json.loads(file.read_text())
        words = report["command"].split()
        given = {
            flag: Path(words[i + 1]).name
            for i, flag in enumerate(words[:-1])
            if flag in ("--prm", "--prm-control")
        }
        for row in report["rows"]:
            flag = {"prm_shuffled": "--prm-control"}.get(row["method"], "--prm")
            uses_prm = row["method"].startswith("prm")
            rows.append(
                {
                    "regime": file.parent.parent.name,
                    "study": file.parent.name,
                    "method": row["method"],
                    "seeds": row["n_seeds"],
                    "final_mean": row["final_mean"],
                    "final_std": row["final_std"],
                    "samples_to_target": row["samples_to_target"],
                    "ratio_vs_outcome": row["gain"],
                    "prm_labels": labels.get(given.get(flag, "")) if uses_prm else None,
                    # labels bought during RL (an on-policy refreshed PRM's), 0 for the others
                    "rl_labels_to_target": row.get("teacher_labels_to_target", 0.0),
                    "rl_labels_final": row.get("teacher_labels_final", 0.0),
                    "target": report["target"],
                }
            )
    return rows


SEARCH_RUNS = "search"
"""`<results>/<setup>/search/<policy>_<scorer>/search.csv`: launch/search.py's tables."""


def search_rows(results: Path) -> list[dict[str, Any]]:
    """summary.json's `search` rows from every launch/search.py table under
    `<results>/<setup>/search/<policy>_<scorer>/`: one per strategy and budget, with the
    policy tokens generated per problem as `budget_tokens`."""
    import csv

    rows: list[dict[str, Any]] = []
    for file in sorted(results.glob(f"*/{SEARCH_RUNS}/*/search.csv")):
        policy, _, scorer = file.parent.name.partition("_")
        with open(file, newline="") as f:
            for r in csv.DictReader(f):
                rows.append(
                    {
                        "regime": file.parent.parent.parent.name,
                        "policy": policy,
                        "scorer": "none" if r["strategy"] == "majority" else scorer,
                        "strategy": r["strategy"],
                        "budget": int(r["budget"]),
                        "budget_tokens": float(r["generated_tokens_per_problem"]),
                        "verifier_tokens": float(r["verifier_tokens_per_problem"]),
                        "accuracy": float(r["accuracy"]),
                        "problems": int(r["problems"]),
                    }
                )
    return rows


def summary(args: argparse.Namespace) -> None:
    """summary.json (`label_curve`) and label_curve.md over every setup run so far."""
    out: dict[str, Any] = {"label_curve": []}
    lines = ["# PRM quality against teacher labels (test split, exact labels)", ""]
    for rows_file in sorted(args.results.glob("*/label_curve.jsonl")):
        setup = rows_file.parent.name
        rows = read_rows(rows_file)
        out["label_curve"] += [{"setup": setup, **r} for r in rows]
        lines += [f"## {setup}", "", rows[0].get("start_model", "") if rows else "", ""]
        lines += [
            "| selection | budget | teacher labels | F1 at 0.5 (mean ± sd) "
            "| F1 at the validation threshold | AUC | seeds |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for settings in sorted({r["settings"] for r in rows}):
            for selection in (*SELECTIONS, CONTROL):
                for budget in sorted({r["budget_frac"] for r in rows}):
                    group = [
                        r
                        for r in rows
                        if r["selection"] == selection
                        and r["budget_frac"] == budget
                        and r["settings"] == settings
                    ]
                    if not group:
                        continue
                    f1, f1_sd = mean_std([r["f1"] for r in group])
                    auc, auc_sd = mean_std([r["auc"] or 0.0 for r in group])
                    labels = statistics.fmean(r["teacher_labels"] for r in group)
                    tuned = [r["f1_tuned"] for r in group if r.get("f1_tuned") is not None]
                    tuned_cell = "-"
                    if tuned:
                        tuned_mean, tuned_sd = mean_std(tuned)
                        tuned_cell = f"{tuned_mean:.3f} ± {tuned_sd:.3f}"
                    lines.append(
                        f"| {selection} | {budget:g} | {labels:.0f} | {f1:.3f} ± {f1_sd:.3f} "
                        f"| {tuned_cell} | {auc:.3f} ± {auc_sd:.3f} | {len(group)} |"
                    )
            fraction = actprm_fraction([r for r in rows if r["settings"] == settings])
            note = "" if fraction != 1.0 else " (only at the full pool, which is uniform's pool)"
            lines += ["", f"PRM settings {settings}; ActPRM fraction: {fraction}{note}", ""]
    out["rl"] = rl_rows(args.results)
    out["search"] = search_rows(args.results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.results / "label_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.action == "data":
        make_data(args)
    elif args.action == "curve":
        curve(args)
    else:
        summary(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
