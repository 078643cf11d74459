"""Sample efficiency of dense process rewards against outcome-only GRPO.

Every method starts from the same SFT policy, trains on the same prompts (same seeds) for the
same number of generated samples, and is evaluated on the held-out `eval` split every
`--eval-every` steps. Methods are override lists in `METHODS` (add one there):

    outcome        GRPO on the outcome reward only (configs/quickstart.yaml settings)
    prime          GRPO-style groups + online implicit PRM, PRIME credit (Eq. 5)
    rloo           RLOO (leave-one-out baseline) on the outcome reward only
    pav            GRPO + PAV step advantages of a Best-of-4 prover (trained verifier)
    pav_base       the same with prover = the base policy (Best-of-1): the paper's negative
                   control, expected to be no better than outcome-only
    pav_terminal   pav with the value after the last step = the response's outcome (the
                   head's `terminal: outcome`): overrated responses cannot raise the credit's sum
    ppo_pav        PPO (critic, GAE) with the PAV step advantages as dense token rewards
    pav_mc_oracle  GRPO + PAV with Q^pi from fresh Monte-Carlo rollouts (MC oracle, n_mc 4)
    gold_steps     GRPO + -1 on the first wrong step from the task's exact labels
                   (oracle-label reference)
    prm            GRPO + -1 on the first step a learned discriminative PRM scores below its
                   threshold (`--prm DIR`: benchmarks/learned_prm.py curve trains one)
    prm_min        the same PRM, PURE's min-form credit on p_h - 1
    prm_clip       the same PRM, Clip (Gao et al. 2024): min(p_h - 0.5, 0) per step
    prm_delta      the same PRM, Delta (Gao et al. 2024): p_h - p_{h+1}, summed return
    prm_prob       the same PRM, the plain probability per step (expected to be gamed)
    prm_shuffled   prm with a PRM trained on shuffled step labels (`--prm-control DIR`):
                   the negative control, expected within noise of outcome-only
    prm_refresh    prm whose PRM is refreshed on-policy: every step the `exact` teacher
                   labels every response (cut after its first wrong step) and the PRM takes
                   one pass over them (the head's `refresh_*` options; labels counted)
    prm_refresh_lite  the same with 8 responses per rank labelled per step
    prm_gated      prm with the step penalties on wrong responses only (the head's
                   `outcome_gate`): the verifier says whether there is an error, the PRM where
    prm_located    prm_gated where a wrong response the PRM flags nowhere takes the penalty at
                   its lowest-p step (`gate_fallback`): every wrong response carries one
                   penalty, so hiding errors from the PRM gains nothing
    prm_located_trust  prm_located with its step rewards scaled by the PRM's agreement with
                   the outcome on each batch (the head's `trust`)
    prm_refresh_anchored  prm_refresh_lite with two anchors against the refresh feeding
                   itself: as many solutions of the PRM's training data (`--prm-replay FILE`)
                   replayed in every refresh, and class-balanced BCE

The task is harder than the quickstart's (which reaches 100%): `TASK_OVERRIDES`. The start
model is built per task config and cached, so all methods share it.

    .venv/bin/python benchmarks/sample_efficiency.py --tune    # 1. choose lr / alpha / PRM lr
    .venv/bin/python benchmarks/sample_efficiency.py           # 2. 3 seeds per method
    .venv/bin/python benchmarks/sample_efficiency.py --quick   # a few minutes, 1 seed, tiny

`--tune` runs each method on the *validation* split (`data.eval_split=validation`) with
`--tune-seeds` seeds (default 1; a setting's score is the mean over them, and one seed can
be too noisy to separate neighbouring learning rates), searching one hyperparameter at a
time over its candidates (policy lr first), and writes what it tried and chose to
`--tuning` (default `<out>/tuning.json`); the full run reads the chosen values
(defaults, said so in the summary, where a method was not tuned).

Each run is `deepspeed --num_gpus 2 launch/train_rl.py ...` with its own output dir under
`--runs-dir`; a run whose metrics.jsonl is complete for the same command is reused, and a
killed one resumes from its last checkpoint, so a killed benchmark can simply be restarted.
The PAV verifier is trained first (`launch/train_pav.py --config configs/quickstart_pav.yaml`)
when a PAV method is selected and it is not there yet. A method whose prerequisites are
missing (no verifier, a credit scheme the trainer does not know) is reported as skipped with
the reason.

Outputs in `--out` (default benchmarks/results/sample_efficiency/):
  evals.csv               one row per (method, seed, eval point); columns in `EVAL_COLUMNS`
  accuracy_vs_samples.png mean over seeds per method, min-max band
  summary.md              final accuracy, samples to reach outcome-only's final accuracy,
                          gain, step time vs outcome-only, the papers' numbers
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import string
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.launching import (
    RUN_DEFAULTS,
    TRAIN_PAV,
    RunResult,
    RunSpec,
    error_line,
    prebuild_start_model,
    read_jsonl,
    run_all,
    start_model_line,
    step_rows,
)

REPO = Path(__file__).resolve().parent.parent


def repo_relative(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (results name no machine's
    absolute paths), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def effective_overrides(overrides: Sequence[str]) -> list[str]:
    """`key=value` overrides as they act: one per key, the last value given, in the order the
    keys first appear (a regime's overrides repeat some of the benchmark task's)."""
    last: dict[str, str] = {}
    for override in overrides:
        last[override.split("=", 1)[0]] = override
    return list(last.values())


CONFIG = "configs/quickstart.yaml"
"""Base config of every method (the quickstart's model, prompts per step, group size...)."""
PAV_CONFIG = "configs/quickstart_pav.yaml"
"""Config for training the PAV verifier (its `pav:` section)."""
PAV_DONE_FILE = "train_pav_metrics.json"
"""Written by launch/train_pav.py last: the verifier is complete."""

TASK_OVERRIDES: tuple[str, ...] = (
    "data.task.n_steps=4",  # 4 operations: ~80% of problems contain the slipped "*"
    "data.task.modulus=10",  # a larger arithmetic table than the quickstart's mod 7
    "rollout.max_new_tokens=48",  # 4 step lines + the answer line fit with room to spare
)
"""The harder task all methods share (the quickstart task saturates at 100%)."""

QUICK_OVERRIDES: tuple[str, ...] = (
    "model.tiny.hidden_size=64",
    "model.tiny.num_heads=2",
    "model.tiny.num_layers=2",
    "model.tiny.intermediate_size=128",
    "model.tiny.sft_steps=60",
    "data.train_size=256",
    "data.eval_size=16",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "trainer.micro_batch_size=8",
    "pav.prompts=8",
    "pav.samples_per_prompt=1",
    "pav.n_mc=2",
    "pav.epochs=1",
    "pav.micro_batch_size=8",
)
"""`--quick`: a tiny model and batch, so every run takes seconds after start-up."""

EVAL_COLUMNS: tuple[str, ...] = (
    "method",
    "seed",
    "step",
    "samples",
    "eval_accuracy",
    "step_s",
    "extra_samples",
    "clean_frac",
    "teacher_labels",
)
"""evals.csv: method name; training seed; training step of the eval; samples generated for
training so far (prompts x group size x step); greedy accuracy on the held-out eval split;
the run's mean training-step time in seconds (steps 2..N: step 1 includes one-off warm-up);
the method's own extra samples so far (the MC oracle's continuations, else 0); the share
of eval answers with every step right (empty when the run did not log it); the teacher
step labels its heads bought during training so far (a refreshed PRM's, else 0)."""

TUNE_SEED = 1000
"""Seed of the tuning runs (different from the full runs' seeds 0, 1, 2...)."""


# ----------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Tunable:
    """A hyperparameter `--tune` searches: its `$name` appears in a method's overrides."""

    name: str
    default: Any
    candidates: tuple[Any, ...]


LR = Tunable("lr", 1e-4, (2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4))
"""8e-4 is in the grid because gold_steps chose 4e-4, the top of the earlier grid, in
`s8m23nz_q40_sft3000` (benchmarks/results/sample_efficiency_regimes/README.md)."""
ALPHA = Tunable("alpha", 0.5, (0.2, 0.5, 1.0, 2.0, 4.0, 8.0))
"""The step-credit weight; 4.0 is in the grid because gold_steps chose 2.0, the top of the
earlier grid, in every modulus-11 and modulus-23 regime, and 8.0 because it chose 4.0 on
three validation seeds in `s8m23nz_q40_sft3000`
(benchmarks/results/sample_efficiency_regimes/README.md)."""
PRM_LR = Tunable("prm_lr", 1e-4, (1e-5, 1e-4, 1e-3))
CRITIC_LR = Tunable("critic_lr", 1e-4, (1e-5, 1e-4, 1e-3))
PRIME_BASELINE = Tunable("baseline", "per_step", ("per_step", "last_token", "per_token_mean"))
"""Where PRIME subtracts the leave-one-out baseline of the implicit reward (a categorical
choice: the literal per-step form of Eq. 5 acts like a per-step penalty)."""


@dataclass(frozen=True)
class Method:
    """One training method: overrides on `CONFIG` with `$param` placeholders."""

    name: str
    label: str
    overrides: tuple[str, ...]
    tunables: tuple[Tunable, ...] = (LR,)
    fixed: dict[str, Any] = field(default_factory=dict)
    """Placeholder values that are not tuned."""
    needs_verifier: bool = False
    """Uses `$verifier`, the PAV verifier trained by launch/train_pav.py."""
    needs_prm: str | None = None
    """Uses `$prm`, the PRM directory given as `--prm` ("prm") or `--prm-control`
    ("prm_control")."""
    needs_replay: bool = False
    """Uses `$prm_replay`, the PRM's training data given as `--prm-replay`."""
    paper: str = "-"
    """The papers' reference number for this method."""

    def defaults(self) -> dict[str, Any]:
        return {**self.fixed, **{t.name: t.default for t in self.tunables}}


PAV_HEAD = (
    "reward.heads=[{head: pav, weight: $head_weight, "
    "kwargs: {path: '$verifier', prover_k: $prover_k}}]"
)


def pav_method(
    name: str, label: str, prover_k: int, paper: str, terminal: str = "verifier"
) -> Method:
    """GRPO + the trained verifier's step advantages of a Best-of-`prover_k` prover; with
    `terminal="outcome"` the value after the last step is the response's outcome."""
    head = PAV_HEAD  # unchanged for the default, so that earlier runs' commands still match
    if terminal != "verifier":
        head = PAV_HEAD.replace("$prover_k}", f"$prover_k, terminal: {terminal}}}")
    return Method(
        name,
        label,
        (head, "algo.credit={name: pav, alpha: $alpha}", "optim.lr=$lr"),
        tunables=(LR, ALPHA),
        fixed={"head_weight": 1.0, "prover_k": prover_k},
        needs_verifier=True,
        paper=paper,
    )


PRM_HEAD = (
    "reward.heads=[{head: prm, kwargs: {path: '$prm', shaping: $shaping, threshold: $threshold}}]"
)
PRM_CREDIT: dict[str, tuple[str, ...]] = {
    "pav": ("algo.credit={name: pav, alpha: $alpha}",),
    "sum": ("algo.credit={name: sum, process_coef: $alpha}", "algo.gamma=1.0"),
    "min_form": (
        "algo.credit={name: min_form, process_coef: $alpha}",
        "algo.gamma=1.0",
    ),
}
"""Each shaping's credit scheme (`rl.algos.prm_shaping.SHAPING_CREDIT`), its step weight
named `$alpha` throughout (PAV's alpha; the process return's coefficient)."""


PRM_ALPHA = Tunable("alpha", 4.0, (2.0, 4.0, 8.0))
"""The PRM methods' step weight: around gold_steps' choice (8.0 in the middle regime)."""
PRM_POLICY_LR = 4e-4
"""The PRM methods' policy lr, not tuned per method (each tuning run costs minutes on the
2-core CPU): the value outcome-only and gold_steps both chose in the 8-step regimes."""


REFRESH_LR = Tunable("refresh_lr", 1e-4, (3e-5, 1e-4, 3e-4))
"""The refreshed PRM's learning rate (it was trained at 3e-4 for 10 epochs)."""
PRM_REFRESH_HEAD = PRM_HEAD.replace(
    "$threshold}", "$threshold, refresh_every: 1, refresh_lr: $refresh_lr}"
)


def prm_method(
    name: str,
    label: str,
    shaping: str,
    credit: str,
    needs: str = "prm",
    paper: str = "-",
    refresh: bool = False,
    refresh_rows: int = 0,
    anchored: bool = False,
    outcome_gate: bool = False,
    gate_fallback: bool = False,
    trust: bool = False,
) -> Method:
    """GRPO + a learned PRM's step rewards shaped by `shaping` under `credit`; the first-error
    threshold is the PRM's own (`--prm-threshold`, chosen on the PRM's validation labels).
    With `refresh`, the PRM is refreshed on-policy every step (its lr tuned too), on
    `refresh_rows` responses per rank (0: all); `anchored` adds the replay of its training
    data and the class-balanced loss; `outcome_gate` confines the step rewards to wrong
    responses, `gate_fallback` penalises the wrong ones it flags nowhere, and `trust` scales
    the step rewards by the PRM's agreement with the outcome."""
    head = PRM_REFRESH_HEAD if refresh else PRM_HEAD
    if refresh_rows:
        head = head.replace("$refresh_lr}", f"$refresh_lr, refresh_rows: {refresh_rows}}}")
    if outcome_gate:
        gate = "outcome_gate: true" + (", gate_fallback: true" if gate_fallback else "")
        gate += ", trust: true" if trust else ""
        head = head.replace("$threshold", f"$threshold, {gate}", 1)
    if anchored:
        anchors = "refresh_replay: '$prm_replay', refresh_balance: true"
        head = head.replace("}}]", f", {anchors}}}}}]")
    return Method(
        name,
        label,
        (head, *PRM_CREDIT[credit], "optim.lr=$lr"),
        tunables=(PRM_ALPHA, REFRESH_LR) if refresh else (PRM_ALPHA,),
        fixed={"shaping": shaping, "lr": PRM_POLICY_LR},
        needs_prm=needs,
        needs_replay=anchored,
        paper=paper,
    )


METHODS: tuple[Method, ...] = (
    Method(
        "outcome",
        "GRPO, outcome only",
        ("algo.credit=outcome", "optim.lr=$lr"),
        paper="baseline",
    ),
    Method(
        "rloo",
        "RLOO, outcome only",
        ("algo.advantage=rloo", "algo.credit=outcome", "optim.lr=$lr"),
        paper="- (PRIME's outcome-only baseline)",
    ),
    Method(
        "prime",
        "GRPO + online implicit PRM (PRIME)",
        (
            "reward.heads=[{head: implicit_prm, kwargs: {beta: 0.05, lr: $prm_lr, update: after}}]",
            "algo.credit={name: prime, process_coef: 1.0, outcome_coef: 1.0, baseline: $baseline}",
            "algo.gamma=1.0",
            "optim.lr=$lr",
        ),
        tunables=(LR, PRM_LR, PRIME_BASELINE),
        paper="PRIME: 2.5x vs RLOO, ~1.28x step time (680 s vs 531 s)",
    ),
    pav_method("pav", "GRPO + PAV (Bo4 prover)", 4, "PAV: 5-6x vs outcome-only RL"),
    pav_method(
        "pav_base",
        "GRPO + PAV, prover = base policy (negative control)",
        1,
        "PAV: no better than outcome-only (the base policy's own advantages)",
    ),
    pav_method(
        "pav_terminal",
        "GRPO + PAV (Bo4 prover), last step valued by its outcome",
        4,
        "- (a finished response's Q^pi is its outcome: step credit sums to Q^mu(r) - Q^mu(s_0))",
        terminal="outcome",
    ),
    Method(
        "ppo_pav",
        "PPO (GAE) + PAV (Bo4 prover)",
        # under gae the head's step advantages are token rewards; alpha is the head weight
        (PAV_HEAD.replace("$head_weight", "$alpha"), "algo.credit=gae")
        + ("critic.lr=$critic_lr", "optim.lr=$lr"),
        tunables=(LR, ALPHA, CRITIC_LR),
        fixed={"prover_k": 4},
        needs_verifier=True,
    ),
    Method(
        "pav_mc_oracle",
        "GRPO + PAV, MC oracle (n_mc 4)",
        (
            "reward.heads=[{head: pav_mc_oracle, kwargs: {n_mc: $n_mc, prover_k: 4}}]",
            "algo.credit={name: pav, alpha: $alpha}",
            "optim.lr=$lr",
        ),
        tunables=(LR, ALPHA),
        fixed={"n_mc": 4},
        paper="- (oracle Q^pi; bounds what a better verifier could give)",
    ),
    Method(
        "gold_steps",
        "GRPO + exact first-error step reward (gold_steps, oracle-label reference)",
        (
            "reward.heads=[{head: gold_steps}]",
            "algo.credit={name: pav, alpha: $alpha}",
            "optim.lr=$lr",
        ),
        tunables=(LR, ALPHA),
        paper="- (exact labels: bounds any learned PRM on this task, at no cost)",
    ),
    prm_method(
        "prm",
        "GRPO + learned PRM, first error",
        "first_error",
        "pav",
        paper="- (gold_steps with the PRM's verdict for the exact labels)",
    ),
    prm_method("prm_min", "GRPO + learned PRM, min-form (PURE)", "min", "min_form"),
    prm_method(
        "prm_gated",
        "GRPO + learned PRM, first error on wrong responses only",
        "first_error",
        "pav",
        paper="- (prm with the outcome verifier deciding which responses hold an error)",
        outcome_gate=True,
    ),
    prm_method(
        "prm_located",
        "GRPO + learned PRM locating the error of each wrong response",
        "first_error",
        "pav",
        paper="- (prm_gated; a wrong response the PRM flags nowhere is penalised at its lowest p)",
        outcome_gate=True,
        gate_fallback=True,
    ),
    prm_method(
        "prm_located_trust",
        "GRPO + learned PRM locating errors, weighted by its agreement with the outcome",
        "first_error",
        "pav",
        paper="- (prm_located; step credit fades as the PRM stops flagging wrong responses)",
        outcome_gate=True,
        gate_fallback=True,
        trust=True,
    ),
    prm_method("prm_clip", "GRPO + learned PRM, Clip", "clip", "pav"),
    prm_method("prm_delta", "GRPO + learned PRM, Delta", "delta", "sum"),
    prm_method("prm_prob", "GRPO + learned PRM, plain probability", "prob", "pav"),
    prm_method(
        "prm_shuffled",
        "GRPO + PRM trained on shuffled labels (negative control)",
        "first_error",
        "pav",
        needs="prm_control",
        paper="- (no step truth: expected within noise of outcome-only)",
    ),
    prm_method(
        "prm_refresh",
        "GRPO + learned PRM refreshed on-policy, first error",
        "first_error",
        "pav",
        paper="- (prm plus the exact teacher's labels on every step's responses)",
        refresh=True,
    ),
    prm_method(
        "prm_refresh_lite",
        "GRPO + learned PRM refreshed on 8 responses per rank and step, first error",
        "first_error",
        "pav",
        paper="- (prm_refresh with the teacher labelling 8 of each rank's responses per step)",
        refresh=True,
        refresh_rows=8,
    ),
    prm_method(
        "prm_refresh_anchored",
        "GRPO + learned PRM refreshed on 8 responses per rank and step, anchored, first error",
        "first_error",
        "pav",
        paper="- (prm_refresh_lite plus replay of the PRM's training data, balanced BCE)",
        refresh=True,
        refresh_rows=8,
        anchored=True,
    ),
)
BASELINE = "outcome"


def yaml_number(value: Any) -> str:
    """A number as YAML reads it back as a number (`1e-05` alone is a string in YAML 1.1)."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            return f"{mantissa}.0e{exponent}"
        return text
    return str(value)


def method_overrides(method: Method, params: dict[str, Any]) -> list[str]:
    """The method's overrides with `$name` placeholders filled from `params`."""
    values = {k: yaml_number(v) if not isinstance(v, str) else v for k, v in params.items()}
    return [string.Template(o).substitute(values) for o in method.overrides]


def select_methods(names: str | None) -> list[Method]:
    """`--methods a,b` in table order; all when None. ValueError names an unknown one."""
    if not names:
        return list(METHODS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {m.name for m in METHODS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {sorted(known)}")
    return [m for m in METHODS if m.name in wanted]


RESOURCE_KEYS: tuple[str, ...] = ("verifier", "prm", "prm_replay")
"""Parameters that are paths to trained models, not hyperparameters."""


def public(params: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a setting (without the verifier's or PRM's path)."""
    return {k: v for k, v in params.items() if k not in RESOURCE_KEYS}


def params_slug(params: dict[str, Any]) -> str:
    """A directory name for a parameter setting, e.g. `alpha=0.5,lr=0.0001`."""
    return ",".join(f"{k}={yaml_number(v)}" for k, v in sorted(public(params).items()))


def with_verifier(
    method: Method, params: dict[str, Any], verifier: dict[str, Any]
) -> dict[str, Any]:
    """`params` plus `verifier` (its path, or a placeholder when it is missing: such runs
    are skipped before launch) for methods that need it, and `prm` (the `--prm` or
    `--prm-control` directory, and the threshold `prm_threshold`) for PRM methods."""
    out = dict(params)
    if method.needs_verifier:
        out["verifier"] = verifier.get("verifier", "<missing>")
    if method.needs_prm:
        out["prm"] = verifier.get(method.needs_prm, "<missing>")
        default = verifier.get("prm_threshold", 0.5)
        own = verifier.get(f"{method.needs_prm}_threshold", default)  # the control's own
        out.setdefault("threshold", own)
    if method.needs_replay:
        out["prm_replay"] = verifier.get("prm_replay", "<missing>")
    return out


def missing_resource(method: Method, resources: dict[str, Any]) -> str | None:
    """Why `method` cannot run with `resources` (no verifier, no PRM), or None."""
    if method.needs_verifier and "verifier" not in resources:
        return str(resources.get("reason", "PAV verifier missing"))
    if method.needs_prm and method.needs_prm not in resources:
        flag = "--prm" if method.needs_prm == "prm" else "--prm-control"
        return f"no PRM: pass {flag} DIR (benchmarks/learned_prm.py curve trains one)"
    if method.needs_replay and "prm_replay" not in resources:
        return "no replay data: pass --prm-replay FILE (the PRM's training data)"
    return None


# ----------------------------------------------------------------------------------- pure: data


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation of one run (a row of evals.csv)."""

    method: str
    seed: int
    step: int
    samples: int
    accuracy: float
    step_s: float
    extra_samples: float = 0.0
    """Samples the method generated beyond the policy's training rollouts up to this point
    (the MC oracle's continuations: `EXTRA_SAMPLES_KEY`), 0 for the others."""
    clean: float | None = None
    """Share of eval answers whose every step is right (`eval/clean_frac`), when logged."""
    teacher_labels: float = 0.0
    """Teacher step labels the method's heads bought during training up to this point
    (`TEACHER_LABELS_KEY`: a refreshed PRM's), 0 for the others."""


TEACHER_LABELS_KEY = "/teacher_labels"
"""Suffix of a head metric counting, cumulatively, the teacher labels it bought (`prm` with
`refresh_every`)."""

EXTRA_SAMPLES_KEY = "/mc_rollouts_per_response"
"""Suffix of a head metric counting its own rollouts per training response (pav_mc_oracle)."""

DIAGNOSTIC_KEYS: tuple[str, ...] = (
    "diag/zero_spread_group_frac",
    "diag/wrong_step_adv_neg_frac",
    "diag/wrong_step_no_step_credit_frac",
    "diag/right_step_in_failed_adv_neg_frac",
    "diag/step_credit_share",
)
"""Credit diagnostics (`logging.credit_diagnostics`, rl/trainer/diagnostics.py) summarised
per method: means over training steps, then over seeds."""


@dataclass(frozen=True)
class Curve:
    """A method's accuracy over samples, aggregated over seeds at the sample counts every
    seed evaluated at."""

    samples: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    """Sample standard deviation over seeds (0 with one seed)."""
    low: tuple[float, ...]
    """Minimum over seeds."""
    high: tuple[float, ...]
    """Maximum over seeds."""
    n_seeds: int


def eval_rows(rows: list[dict[str, Any]]) -> list[tuple[int, int, float]]:
    """(step, samples, eval accuracy) of every eval row, by step (the last row of a step
    wins, as after a resume)."""
    by_step = {
        int(r["step"]): (int(r["step"]), int(r["samples"]), float(r["eval/accuracy"]))
        for r in rows
        if r.get("eval/accuracy") is not None and "samples" in r
    }
    return [by_step[s] for s in sorted(by_step)]


def mean_step_time(rows: list[dict[str, Any]], skip_first: int = 1) -> float:
    """Mean `time/step_s` over the training steps after the first `skip_first` (all steps
    when there are not more than that); NaN without steps."""
    steps = step_rows(rows)
    times = [float(r["time/step_s"]) for r in steps]
    if len(times) > skip_first:
        times = times[skip_first:]
    return statistics.fmean(times) if times else math.nan


def extra_samples_by_step(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Cumulative extra samples (`EXTRA_SAMPLES_KEY` metrics x the step's new training
    samples) after each logged step (0 at step 0)."""
    out, total, previous = {0: 0.0}, 0.0, 0
    for row in step_rows(rows):
        per_response = sum(float(v) for k, v in row.items() if k.endswith(EXTRA_SAMPLES_KEY))
        samples = int(row["samples"])
        total += per_response * (samples - previous)
        previous = samples
        out[int(row["step"])] = total
    return out


def labels_by_step(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Cumulative teacher labels (`TEACHER_LABELS_KEY` metrics, summed over heads) after each
    logged step (0 at step 0)."""
    out = {0: 0.0}
    for row in step_rows(rows):
        out[int(row["step"])] = sum(
            float(v) for k, v in row.items() if k.endswith(TEACHER_LABELS_KEY)
        )
    return out


def run_points(method: str, seed: int, rows: list[dict[str, Any]]) -> list[EvalPoint]:
    """The eval points of one run's metrics rows."""
    step_s = mean_step_time(rows)
    extra = extra_samples_by_step(rows)
    labels = labels_by_step(rows)
    clean = {
        int(r["step"]): r["eval/clean_frac"] for r in rows if r.get("eval/clean_frac") is not None
    }
    return [
        EvalPoint(
            method,
            seed,
            st,
            sa,
            acc,
            step_s,
            extra.get(st, 0.0),
            clean.get(st),
            labels.get(st, 0.0),
        )
        for st, sa, acc in eval_rows(rows)
    ]


def run_diagnostics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each `DIAGNOSTIC_KEYS` metric over a run's training steps (NaNs, i.e. steps
    with nothing to count, skipped); keys the run did not log are left out."""
    out = {}
    for key in DIAGNOSTIC_KEYS:
        # a step with nothing to count logs NaN: "NaN" in metrics.jsonl (null in older runs)
        values = [float(r[key]) for r in step_rows(rows) if r.get(key) is not None]
        values = [v for v in values if math.isfinite(v)]
        if values:
            out[key] = statistics.fmean(values)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def aggregate_curve(points: Iterable[EvalPoint]) -> Curve:
    """Mean / std / min / max over seeds at each sample count that every seed has."""
    by_seed: dict[int, dict[int, float]] = {}
    for p in points:
        by_seed.setdefault(p.seed, {})[p.samples] = p.accuracy
    if not by_seed:
        raise ValueError("aggregate_curve of no points")
    common = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    mean, std, low, high = [], [], [], []
    for s in common:
        values = [seed_points[s] for seed_points in by_seed.values()]
        m, sd = mean_std(values)
        mean.append(m)
        std.append(sd or 0.0)
        low.append(min(values))
        high.append(max(values))
    return Curve(tuple(common), tuple(mean), tuple(std), tuple(low), tuple(high), len(by_seed))


def samples_to_reach(curve: Curve, target: float, tol: float = 1e-9) -> int | None:
    """Samples at the first eval point whose mean accuracy is at or above `target`; None
    when no point reaches it."""
    for samples, accuracy in zip(curve.samples, curve.mean, strict=True):
        if accuracy >= target - tol:
            return samples
    return None


def efficiency_gain(baseline_samples: int | None, method_samples: int | None) -> float | None:
    """Sample-efficiency gain = baseline samples / method samples to reach the same
    accuracy; None when either did not reach it; inf when the method was there at 0."""
    if baseline_samples is None or method_samples is None:
        return None
    if method_samples == 0:
        return 1.0 if baseline_samples == 0 else math.inf
    return baseline_samples / method_samples


def gain_lower_bound(baseline_final_samples: int, method_samples: float | None) -> float | None:
    """When the baseline never reached the target within `baseline_final_samples` but the
    method did with `method_samples`, the gain is more than their ratio: that ratio (shown
    as `> r`); None when the method did not reach it either."""
    if method_samples is None or method_samples <= 0:
        return None
    return baseline_final_samples / method_samples


TARGET_RULES: tuple[str, ...] = ("half-gap", "outcome-final")
"""How `summarize` sets the target accuracy: the start accuracy plus half the gap to 100%
(the same for every method: the issue's fixed target), or the baseline's final mean."""


def start_accuracy(points: Sequence[EvalPoint]) -> float | None:
    """Mean accuracy at 0 samples over every run (all methods start from the same policy
    and are evaluated on the same prompts, so these agree up to kernel noise)."""
    at_start = [p.accuracy for p in points if p.samples == 0]
    return statistics.fmean(at_start) if at_start else None


def target_accuracy(
    points: Sequence[EvalPoint], curves: dict[str, Curve], rule: str, baseline: str
) -> float | None:
    """The target of `rule` (`TARGET_RULES`); None when its inputs are missing."""
    if rule == "half-gap":
        start = start_accuracy(points)
        return None if start is None else start + (1.0 - start) / 2
    if rule == "outcome-final":
        return curves[baseline].mean[-1] if baseline in curves else None
    raise ValueError(f"unknown target rule {rule!r}; valid: {list(TARGET_RULES)}")


@dataclass(frozen=True)
class SummaryRow:
    """One method's line of summary.md."""

    method: str
    label: str
    n_seeds: int
    final_samples: int
    final_mean: float
    final_std: float | None
    samples_to_target: int | None
    gain: float | None
    step_s: float
    """Mean over seeds of each run's mean step time."""
    step_time_ratio: float | None
    """step_s / the baseline's step_s."""
    paper: str
    gain_is_lower_bound: bool = False
    """The baseline did not reach the target: `gain` is a lower bound (`> gain`)."""
    extra_samples_to_target: float = 0.0
    """Mean over seeds of the method's extra samples (MC rollouts) when it reached the target."""
    gain_with_extra: float | None = None
    """The gain with the extra samples counted (None when there are none or no target)."""
    extra_samples_final: float = 0.0
    """Mean over seeds of the method's extra samples at its last eval point."""
    teacher_labels_to_target: float = 0.0
    """Mean over seeds of the teacher labels its heads bought when it reached the target."""
    teacher_labels_final: float = 0.0
    """Mean over seeds of the teacher labels its heads bought by its last eval point."""
    diagnostics: dict[str, float] = field(default_factory=dict)
    """`DIAGNOSTIC_KEYS` means over seeds, and `eval/clean_frac` at the end when logged."""


def not_reached_with_extra(final_samples: int, extra_final: float) -> str:
    """The extra-samples cell of a method that did not reach the target: its total sample
    count at the end when it has extra samples, else "same"."""
    if not extra_final:
        return "same"
    return f"not reached in {final_samples + extra_final:,.0f} samples"


def summarize(
    points: list[EvalPoint],
    methods: Sequence[Method],
    baseline: str = BASELINE,
    rule: str = "half-gap",
    diagnostics: dict[str, list[dict[str, float]]] | None = None,
) -> tuple[float | None, list[SummaryRow]]:
    """(target accuracy, one row per method with points), in `methods` order.

    The target follows `rule` (`TARGET_RULES`); a method's samples-to-target is the first
    point of its mean curve at or above it; the gain divides the baseline's samples-to-target
    by the method's (a lower bound, from the baseline's final sample count, when only the
    method reached it). `diagnostics`: per method, one `run_diagnostics` dict per seed.
    """
    curves = {
        m.name: aggregate_curve(p for p in points if p.method == m.name)
        for m in methods
        if any(p.method == m.name for p in points)
    }
    step_s = {
        name: statistics.fmean({p.seed: p.step_s for p in points if p.method == name}.values())
        for name in curves
    }
    target = target_accuracy(points, curves, rule, baseline)
    base_curve = curves.get(baseline)
    base_samples = (
        samples_to_reach(base_curve, target) if base_curve and target is not None else None
    )
    rows = []
    for m in methods:
        if m.name not in curves:
            continue
        curve = curves[m.name]
        mine = [p for p in points if p.method == m.name]
        final = [p.accuracy for p in mine if p.samples == curve.samples[-1]]
        final_mean, final_std = mean_std(final)
        reach = samples_to_reach(curve, target) if target is not None else None
        extra = (
            statistics.fmean([p.extra_samples for p in mine if p.samples == reach])
            if reach is not None
            else 0.0
        )
        extra_final = statistics.fmean(
            [p.extra_samples for p in mine if p.samples == curve.samples[-1]]
        )
        last = [p for p in mine if p.samples == curve.samples[-1]]
        labels_final = statistics.fmean([p.teacher_labels for p in last])
        labels_reach = (
            statistics.fmean([p.teacher_labels for p in mine if p.samples == reach])
            if reach is not None
            else 0.0
        )
        gain, bound = efficiency_gain(base_samples, reach), False
        gain_extra = efficiency_gain(base_samples, reach + extra) if extra and reach else None
        if base_curve is not None and target is not None and base_samples is None:
            gain, bound = gain_lower_bound(base_curve.samples[-1], reach), reach is not None
            gain_extra = (
                gain_lower_bound(base_curve.samples[-1], reach + extra) if extra and reach else None
            )
        base_step = step_s.get(baseline)
        per_seed = (diagnostics or {}).get(m.name, [])
        diag = {
            key: statistics.fmean([d[key] for d in per_seed if key in d])
            for key in DIAGNOSTIC_KEYS
            if any(key in d for d in per_seed)
        }
        clean = [p.clean for p in mine if p.samples == curve.samples[-1] and p.clean is not None]
        if clean:
            diag[CLEAN_KEY] = statistics.fmean(clean)
        rows.append(
            SummaryRow(
                method=m.name,
                label=m.label,
                n_seeds=curve.n_seeds,
                final_samples=curve.samples[-1],
                final_mean=final_mean,
                final_std=final_std,
                samples_to_target=reach,
                gain=gain,
                step_s=step_s[m.name],
                step_time_ratio=(step_s[m.name] / base_step) if base_step else None,
                paper=m.paper,
                gain_is_lower_bound=bound,
                extra_samples_to_target=extra,
                gain_with_extra=gain_extra,
                extra_samples_final=extra_final,
                teacher_labels_to_target=labels_reach,
                teacher_labels_final=labels_final,
                diagnostics=diag,
            )
        )
    return target, rows


def format_accuracy(mean: float, std: float | None) -> str:
    """`72.3 ± 2.1%`, or `72.3%` without a std."""
    return f"{100 * mean:.1f}%" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}%"


def format_ratio(value: float | None, lower_bound: bool = False) -> str:
    if value is None:
        return "-"
    text = "inf" if math.isinf(value) else f"{value:.2f}x"
    return f"> {text}" if lower_bound else text


def render_table(target: float | None, rows: list[SummaryRow]) -> str:
    """The markdown results table of summary.md."""
    reach_head = (
        f"samples to reach {100 * target:.1f}%" if target is not None else "samples to reach"
    )
    out = [
        f"| method | seeds | final eval accuracy (mean ± std) | {reach_head} "
        "| samples-to-target gain vs outcome-only | with the head's own rollouts counted "
        "| step time vs outcome-only | papers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if not rows:
        out.append("| (no finished runs) | | | | | | | |")
    for r in rows:
        if target is None:
            reach = "n/a (no target)"
        elif r.samples_to_target is None:
            reach = "not reached"
        else:
            reach = f"{r.samples_to_target:,}"
        if r.extra_samples_to_target and r.samples_to_target is not None:
            total = r.samples_to_target + r.extra_samples_to_target
            extra = (
                f"{total:,.0f} samples: {format_ratio(r.gain_with_extra, r.gain_is_lower_bound)}"
            )
        else:
            extra = not_reached_with_extra(r.final_samples, r.extra_samples_final)
        step = f"{format_ratio(r.step_time_ratio)} ({r.step_s:.2f} s)"
        out.append(
            f"| {r.label} | {r.n_seeds} | {format_accuracy(r.final_mean, r.final_std)} "
            f"| {reach} | {format_ratio(r.gain, r.gain_is_lower_bound)} | {extra} | {step} "
            f"| {r.paper} |"
        )
    return "\n".join(out) + "\n"


CLEAN_KEY = "eval/clean_frac"

DIAGNOSTIC_HEADS: dict[str, str] = {
    CLEAN_KEY: "final eval answers with every step right",
    "diag/zero_spread_group_frac": "groups with one outcome",
    "diag/wrong_step_adv_neg_frac": "first wrong steps pushed down",
    "diag/wrong_step_no_step_credit_frac": "first wrong steps without step credit",
    "diag/right_step_in_failed_adv_neg_frac": "right steps of failed responses pushed down",
    "diag/step_credit_share": "step-credit share of the advantage",
}


def render_diagnostics(rows: list[SummaryRow]) -> str:
    """The credit-diagnostics table (empty when no run logged them)."""
    keys = [k for k in (CLEAN_KEY, *DIAGNOSTIC_KEYS) if any(k in r.diagnostics for r in rows)]
    if not keys:
        return ""
    out = [
        "| method | " + " | ".join(DIAGNOSTIC_HEADS[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for r in rows:
        cells = [f"{100 * r.diagnostics[k]:.1f}%" if k in r.diagnostics else "-" for k in keys]
        out.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render_summary(
    target: float | None,
    rows: list[SummaryRow],
    not_run: list[tuple[str, str]],
    meta: dict[str, Any],
) -> str:
    """summary.md: setup, the table, what did not run and why, notes."""
    lines = [
        "# Sample efficiency: dense process rewards vs outcome-only GRPO",
        "",
        f"Command: `{meta.get('command', '')}`  ",
        f"Task: `{' '.join(meta.get('task', []))}`; {meta.get('budget', '')}  ",
        f"Hyperparameters: {meta.get('hyperparameters', '')}",
        "",
    ]
    if meta.get("start_model"):
        lines[-1:-1] = [f"Start model: {meta['start_model']}"]
    if target is not None and rows:
        if meta.get("target_rule", "half-gap") == "half-gap":
            start = meta.get("start_accuracy")
            at = f"{100 * start:.1f}% " if start is not None else ""
            lines += [
                f"Target: {100 * target:.1f}%, the start accuracy {at}plus half the gap to "
                "100%, the same for every method.",
                "",
            ]
        else:
            base = next((r for r in rows if r.method == BASELINE), None)
            at = f" at {base.final_samples:,} samples" if base else ""
            lines += [
                f"Target: outcome-only GRPO's final mean eval accuracy, {100 * target:.1f}%{at}.",
                "",
            ]
    lines.append(render_table(target, rows))
    labelled = [r for r in rows if r.teacher_labels_final]
    if labelled:
        lines += [
            "Teacher step labels bought during training (besides any PRM's own training "
            "labels; mean over seeds): "
            + "; ".join(
                f"{r.label}: {r.teacher_labels_to_target:,.0f} by the target, "
                f"{r.teacher_labels_final:,.0f} in all"
                if r.samples_to_target is not None
                else f"{r.label}: {r.teacher_labels_final:,.0f} in all"
                for r in labelled
            )
            + ".",
            "",
        ]
    if meta.get("verifier"):
        lines += [f"PAV verifier: {meta['verifier']}", ""]
    if not_run:
        lines += ["Not run:", ""]
        lines += [f"- {name}: {reason}" for name, reason in not_run]
        lines.append("")
    diagnostics = render_diagnostics(rows)
    if diagnostics:
        lines += [
            "Credit diagnostics (exact step labels of the built-in task; means over training "
            "steps, then seeds; see rl/trainer/diagnostics.py):",
            "",
            diagnostics,
        ]
    lines += [
        "How to read it: accuracy is greedy accuracy on the held-out eval split, mean over seeds "
        "(± sample std). Samples are the policy rollouts used for training (prompts x group size "
        "x steps), the same for every method; the PAV verifier's own training data is not "
        "counted; the MC oracle's extra continuations are counted in their own column. Samples "
        "to reach: the first eval point of the method's mean curve at or above the target (only "
        "eval points count, so it is rounded up to the eval interval). Gain: outcome-only's "
        "samples to reach the target divided by the method's; `> r` when outcome-only never "
        "reached it (r uses its final sample count). Step time: mean over seeds of each run's "
        "mean training-step time (steps 2..N), relative to outcome-only.",
        "",
        "Papers' reference numbers (different models and scale, see docs/algorithms.md): "
        "PAV (Setlur et al. 2024) 5-6x sample efficiency and >6% accuracy over outcome-only RL "
        "(Gemma-2 2B/9B/27B, MATH); PRIME (Cui et al. 2025) 2.5x sample efficiency over RLOO "
        "with the outcome verifier, at about 28% more time per step (680 s vs 531 s, "
        "Qwen2.5-Math-7B).",
        "",
    ]
    return "\n".join(lines)


def write_evals_csv(points: list[EvalPoint], path: Path) -> None:
    """evals.csv, columns `EVAL_COLUMNS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(EVAL_COLUMNS)
        for p in points:
            writer.writerow(
                [
                    p.method,
                    p.seed,
                    p.step,
                    p.samples,
                    f"{p.accuracy:.6f}",
                    f"{p.step_s:.4f}",
                    f"{p.extra_samples:.0f}",
                    "" if p.clean is None else f"{p.clean:.6f}",
                    f"{p.teacher_labels:.0f}",
                ]
            )


def plot_curves(
    curves: dict[str, Curve],
    target: float | None,
    path: Path,
    title: str = "",
    target_label: str = "target",
) -> str | None:
    """accuracy_vs_samples.png: mean line and min-max band per method. Returns None, or why
    no plot was written (matplotlib missing)."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed; no plot written"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        (line,) = ax.plot(
            curve.samples, curve.mean, marker="o", ms=3, label=f"{label} (n={curve.n_seeds})"
        )
        if curve.n_seeds > 1:
            ax.fill_between(
                curve.samples, curve.low, curve.high, color=line.get_color(), alpha=0.15
            )
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=target_label)
    ax.set_xlabel("training samples generated")
    ax.set_ylabel("held-out eval accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy vs samples (mean over seeds, band = min-max)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------- pure: tuning


def validation_score(points: list[EvalPoint]) -> tuple[float, float]:
    """Tuning criterion of one run: (mean accuracy over the eval points after step 0 = area
    under the accuracy-vs-samples curve, final accuracy as the tie-break)."""
    later = [p.accuracy for p in points if p.samples > 0] or [p.accuracy for p in points]
    final = max(points, key=lambda p: p.samples).accuracy
    return statistics.fmean(later), final


def choose(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best finished trial by `score` (higher is better; the first wins ties)."""
    finished = [t for t in trials if t.get("score") is not None]
    return max(finished, key=lambda t: tuple(t["score"])) if finished else None


def chosen_params(method: Method, tuning: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """A method's placeholder values for the full run and where they come from."""
    params = method.defaults()
    entry = (tuning or {}).get("methods", {}).get(method.name)
    if entry and entry.get("chosen"):
        params.update(entry["chosen"])
        if entry.get("borrowed_from"):
            return params, f"not tuned: {entry['borrowed_from']}'s tuned values"
        n_seeds = len(entry.get("seeds", [TUNE_SEED]))
        return params, f"tuned on the validation split ({n_seeds} seed{'s' * (n_seeds > 1)})"
    return params, "defaults (not tuned)"


def borrow_tuning(tuning: dict[str, Any], method: Method, source: str) -> dict[str, Any]:
    """`tuning` with `method`'s values copied from `source`'s tuned ones (`--borrow`, for a
    method too costly to tune; the summary says so). KeyError names a missing source."""
    chosen = tuning.get("methods", {}).get(source, {}).get("chosen")
    if not chosen:
        raise KeyError(f"--borrow {method.name}={source}: {source} has no tuned values")
    values = {t.name: chosen[t.name] for t in method.tunables if t.name in chosen}
    entry = {"chosen": {**method.defaults(), **values}, "borrowed_from": source}
    return {**tuning, "methods": {**tuning.get("methods", {}), method.name: entry}}


def other_start_model(recorded: str | None, current: str, source: str | Path) -> str | None:
    """Why `source`'s tuned values (made on start model `recorded`) must not be used with
    this run's start model `current`, or None when they may: the same copy, or either not
    known (older files, models that are not built-in). Both are `start_model_line`s."""
    if not recorded or not current or recorded == current:
        return None
    return (
        f"{source} was tuned on start model {recorded!r}, but this run's start model is "
        f"{current!r}. Two builds of one recipe on different machines or library versions "
        "can be different policies, so values tuned on one need not hold on the other. "
        "Tune again (--tune, into another --out or --tuning), or pass "
        "--allow-other-start-model to use them anyway"
    )


# ----------------------------------------------------------------------------------- driving


@dataclass(frozen=True)
class Setup:
    """Settings shared by every run of one invocation."""

    runs_dir: Path
    base: tuple[str, ...]
    """Task, budget, size and cache overrides (method overrides come after)."""
    extra: tuple[str, ...]
    """The command line's own overrides: last, so they win over everything."""
    steps: int
    eval_every: int
    ranks: int
    start_model: str = ""
    """The built-in start model's cache name and weights digest (which copy every run used)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps, tiny model")
    parser.add_argument("--tune", action="store_true", help="choose hyperparameters on validation")
    parser.add_argument(
        "--tune-seeds",
        type=int,
        default=1,
        help="--tune: validation seeds per setting (scores averaged; one seed can be noise)",
    )
    parser.add_argument(
        "--tune-grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="--tune: search only these candidates of a hyperparameter (recorded as tried)",
    )
    parser.add_argument("--methods", default=None, help="comma-separated subset of METHODS")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (60; quick 4)")
    parser.add_argument("--eval-every", type=int, default=None, help="(10; quick 2)")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--runs-dir", type=Path, default=None, help="run output directories")
    parser.add_argument("--tuning", type=Path, default=None, help="tuning JSON (<out>/tuning.json)")
    parser.add_argument("--cache-dir", default=None, help="start-model cache (model.cache_dir)")
    parser.add_argument("--ranks", type=int, default=2, help="deepspeed --num_gpus")
    parser.add_argument(
        "--target",
        choices=TARGET_RULES,
        default="half-gap",
        help="target accuracy: start + half the gap to 100%% (default) or outcome-only's final",
    )
    parser.add_argument(
        "--borrow",
        action="append",
        default=[],
        metavar="METHOD=FROM",
        help="run METHOD with FROM's tuned values instead of its own (reported as not tuned)",
    )
    parser.add_argument(
        "--allow-other-start-model",
        action="store_true",
        help="use a tuning JSON made on another build of the start model (its weights differ)",
    )
    parser.add_argument("--prm", type=Path, default=None, help="PRM directory of the prm_* methods")
    parser.add_argument(
        "--prm-control", type=Path, default=None, help="shuffled-label PRM of prm_shuffled"
    )
    parser.add_argument(
        "--prm-threshold",
        type=float,
        default=0.5,
        help="first-error threshold of the PRM methods (choose it on the PRM's validation labels)",
    )
    parser.add_argument(
        "--prm-control-threshold",
        type=float,
        default=None,
        help="prm_shuffled's threshold (default --prm-threshold; choose it so the control "
        "flags as many solutions as the PRM does)",
    )
    parser.add_argument(
        "--prm-replay",
        type=Path,
        default=None,
        help="the PRM's training data (a step dataset), replayed by prm_refresh_anchored",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    return parser.parse_args(argv)


def make_setup(args: argparse.Namespace) -> Setup:
    steps = args.steps or (4 if args.quick else 60)
    every = args.eval_every or (2 if args.quick else 10)
    runs_dir = args.runs_dir or REPO / "benchmarks" / "runs" / (
        "sample_efficiency_quick" if args.quick else "sample_efficiency"
    )
    base = [*TASK_OVERRIDES, *(QUICK_OVERRIDES if args.quick else ())]
    base += [f"trainer.max_steps={steps}", f"trainer.eval_every={every}"]
    base += [f"trainer.save_every={every}", "logging.credit_diagnostics=true"]
    if args.cache_dir:
        base.append(f"model.cache_dir={Path(args.cache_dir).resolve()}")
    return Setup(runs_dir.resolve(), tuple(base), tuple(args.overrides), steps, every, args.ranks)


def run_spec(
    setup: Setup, method: Method, params: dict[str, Any], seed: int, split: str, out_dir: Path
) -> RunSpec:
    """One training run of `method` with `params`, evaluated on `split`."""
    overrides = [*RUN_DEFAULTS, *setup.base, *method_overrides(method, params)]
    overrides += [f"seed={seed}", f"data.eval_split={split}", *setup.extra]
    return RunSpec(
        name=f"{method.name} seed{seed}"
        if split == "eval"
        else f"{method.name} {params_slug(params)}",
        out_dir=out_dir,
        overrides=tuple(overrides),
        max_steps=setup.steps,
        config=CONFIG,
        ranks=setup.ranks,
        group=method.name,
        start_model=setup.start_model,
    )


def verifier_spec(setup: Setup) -> RunSpec:
    """The PAV verifier's training job (trained once, from the shared start model)."""
    out = setup.runs_dir / "pav_verifier"
    keep = [o for o in setup.base if not o.startswith("trainer.")]
    overrides = ("logging.wandb=false", *keep, *setup.extra, f"pav.output_dir={out}")
    return RunSpec(
        name="pav verifier",
        out_dir=out,
        overrides=overrides,
        max_steps=0,
        config=PAV_CONFIG,
        script=TRAIN_PAV,
        ranks=setup.ranks,
        done_file=PAV_DONE_FILE,
        group="pav_verifier",
        start_model=setup.start_model,
    )


def ensure_pav_verifier(setup: Setup) -> tuple[Path | None, str]:
    """The trained verifier's directory, training it first if needed; (None, why) when it
    cannot be had (train_pav missing or failing)."""
    for needed in (TRAIN_PAV, PAV_CONFIG):
        if not (REPO / needed).is_file():
            return None, f"PAV verifier: {needed} does not exist"
    spec = verifier_spec(setup)
    (result,) = run_all([spec], desc="pav verifier")
    if not result.ok:
        return None, f"PAV verifier training {result.status}: {result.reason}"
    return spec.out_dir, ""


PRM_EVAL = "launch/eval_prm.py"
PRM_EVAL_FILE = "prm_eval.json"
"""The verifier's first-error F1 (written by launch/eval_prm.py into the verifier's dir)."""

TUNE_THRESHOLD_SPLIT = "validation"
"""Where the verifier's second F1 chooses its threshold (the F1 itself is on the eval split)."""


def verifier_quality(setup: Setup, verifier_dir: Path) -> dict[str, Any] | None:
    """The trained verifier's first-error scores on the task's exactly labelled held-out
    solutions (`launch/eval_prm.py --data builtin`, eval split), at the fixed threshold 0.5
    and, under "tuned", at the threshold with the best F1 on the validation split; computed
    once and cached in the verifier's directory; None (the reason printed) when the
    evaluation fails."""
    keep = [o for o in setup.base if not o.startswith(("trainer.", "logging."))]
    overrides = [*keep, *setup.extra]
    fixed = prm_eval_scores(verifier_dir, CONFIG, overrides)
    if fixed is None:
        return None
    tuned = prm_eval_scores(verifier_dir, CONFIG, overrides, tune_split=TUNE_THRESHOLD_SPLIT)
    return {**fixed, "tuned": tuned}


def prm_eval_scores(
    verifier_dir: Path,
    config: str,
    overrides: Sequence[str],
    tune_split: str | None = None,
) -> dict[str, Any] | None:
    """First-error scores of the PAV verifier in `verifier_dir` on the built-in task's
    exactly labelled eval-split solutions (`launch/eval_prm.py --data builtin` with `config`
    and `overrides`; with `tune_split`, at the threshold chosen there), cached as
    `prm_eval.json` (or `prm_eval_tuned_<split>.json`) there; None (reason printed) on
    failure."""
    name = PRM_EVAL_FILE if tune_split is None else f"prm_eval_tuned_{tune_split}.json"
    out = verifier_dir / name
    if not out.is_file():
        cmd = [sys.executable, PRM_EVAL, "--config", config, "--head", "pav"]
        cmd += ["--head-kwargs", f"{{path: '{verifier_dir}'}}", "--data", "builtin"]
        cmd += [] if tune_split is None else ["--tune-threshold-on", tune_split]
        cmd += ["--out", str(out), "logging.progress_bar=false", *overrides]
        print("verifier first-error F1: " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"verifier evaluation failed: {error_line(proc.stdout + proc.stderr)}")
            return None
    results = json.loads(out.read_text())
    scores = results["scores"]
    quality = {k: scores.get(k) for k in ("f1", "acc_error", "acc_correct", "n")}
    return {**quality, "threshold": results.get("threshold", 0.5)}


def verifier_line(quality: dict[str, Any] | None) -> str:
    """summary.md's line on the trained verifier's quality."""
    if not quality:
        return ""

    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * float(x):.1f}%"

    line = (
        f"first-error F1 {pct(quality['f1'])} on {quality['n']} exactly labelled held-out "
        f"solutions (accuracy on wrong ones {pct(quality['acc_error'])}, on right ones "
        f"{pct(quality['acc_correct'])}; launch/eval_prm.py --data builtin, threshold 0.5)"
    )
    tuned = quality.get("tuned")
    if not tuned:
        return line + "."
    return line + (
        f"; {pct(tuned['f1'])} at threshold {tuned['threshold']:.2f}, the best on the "
        f"{TUNE_THRESHOLD_SPLIT} split (accuracy on wrong ones {pct(tuned['acc_error'])}, "
        f"on right ones {pct(tuned['acc_correct'])}; the verifier predicts the base policy's "
        "P(success), below 0.5 on every step when that policy is weak)."
    )


def final_accuracy(result: RunResult) -> str:
    points = eval_rows(read_jsonl(result.spec.out_dir / "metrics.jsonl"))
    return f"final eval acc {points[-1][2]:.3f}" if points else ""


def skip_after_config_error(
    prerequisites: dict[str, str],
) -> Callable[[RunSpec, list[RunResult]], str | None]:
    """A `run_all` skip function: a method with a missing prerequisite, or whose earlier run
    was skipped for a user error, is not launched again."""
    reasons = dict(prerequisites)

    def skip(spec: RunSpec, earlier: list[RunResult]) -> str | None:
        for result in earlier:
            if result.spec.group == spec.group and result.status == "skipped":
                reasons.setdefault(spec.group, result.reason)
        return reasons.get(spec.group)

    return skip


def collect_points(
    results: list[RunResult], seeds: dict[Path, int]
) -> tuple[list[EvalPoint], dict[str, list[dict[str, float]]]]:
    """The finished runs' eval points, and per method one `run_diagnostics` per run."""
    points: list[EvalPoint] = []
    diagnostics: dict[str, list[dict[str, float]]] = {}
    for r in results:
        if r.ok:
            rows = read_jsonl(r.spec.out_dir / "metrics.jsonl")
            points += run_points(r.spec.group, seeds[r.spec.out_dir], rows)
            diagnostics.setdefault(r.spec.group, []).append(run_diagnostics(rows))
    return points, diagnostics


def not_run_reasons(results: list[RunResult]) -> list[tuple[str, str]]:
    """(method, `status: reason`) once per method with runs that did not finish."""
    out: dict[str, str] = {}
    for r in results:
        if not r.ok and r.spec.group not in out:
            n = sum(1 for x in results if x.spec.group == r.spec.group and not x.ok)
            out[r.spec.group] = f"{r.status} ({n} run(s)): {r.reason}"
    return list(out.items())


def tune_seeds(n_seeds: int) -> list[int]:
    """The tuning runs' seeds: TUNE_SEED, TUNE_SEED + 1, ... (`--tune-seeds`)."""
    return [TUNE_SEED + k for k in range(n_seeds)]


def tune_dir(setup: Setup, method: Method, trial: dict[str, Any], seed: int) -> Path:
    """A tuning run's directory (the first seed's has no seed suffix, as before)."""
    out = setup.runs_dir / "tune" / method.name / params_slug(trial)
    return out if seed == TUNE_SEED else out / f"seed{seed}"


def mean_score(scores: list[tuple[float, float] | None]) -> tuple[float, float] | None:
    """The tuning score over seeds: the elementwise mean of (area, final), or None when
    any seed's run did not finish (a setting is compared on all its seeds or not at all)."""
    if not scores or any(score is None for score in scores):
        return None
    done = [score for score in scores if score is not None]
    return statistics.fmean(a for a, _ in done), statistics.fmean(f for _, f in done)


def tune_coordinate(
    setup: Setup, method: Method, params: dict[str, Any], tunable: Tunable, n_seeds: int
) -> list[dict[str, Any]]:
    """Runs every candidate of `tunable` (others at `params`) on `n_seeds` validation seeds;
    one trial record per candidate, scored by `mean_score`."""
    seeds = tune_seeds(n_seeds)
    specs = []
    for value in tunable.candidates:
        trial = {**params, tunable.name: value}
        for seed in seeds:
            out = tune_dir(setup, method, trial, seed)
            specs.append(run_spec(setup, method, trial, seed, "validation", out))
    results = run_all(specs, final_accuracy, desc=f"tune {method.name} {tunable.name}")
    coordinate = []
    for i, value in enumerate(tunable.candidates):
        runs = results[i * len(seeds) : (i + 1) * len(seeds)]
        scores = []
        for seed, result in zip(seeds, runs, strict=True):
            rows = read_jsonl(result.spec.out_dir / "metrics.jsonl") if result.ok else []
            pts = run_points(method.name, seed, rows)
            scores.append(validation_score(pts) if pts else None)
        score = mean_score(scores)
        bad = next((r for r in runs if not r.ok), runs[0])
        coordinate.append(
            {
                "param": tunable.name,
                "value": value,
                "params": public({**params, tunable.name: value}),
                "status": bad.status,
                "reason": bad.reason,
                "score": list(score) if score else None,
                "seed_scores": [list(x) if x else None for x in scores],
                "run_dir": repo_relative(runs[0].spec.out_dir),
            }
        )
    return coordinate


def parse_grid(items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """`--tune-grid NAME=v1,v2` items -> {NAME: candidates} (numbers where they parse);
    ValueError naming a malformed item."""
    grid: dict[str, tuple[Any, ...]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise ValueError(f"--tune-grid {item!r}: expected NAME=v1[,v2...]")
        parsed: list[Any] = []
        for value in values.split(","):
            try:
                parsed.append(float(value))
            except ValueError:
                parsed.append(value)
        grid[name] = tuple(parsed)
    return grid


def tune(
    setup: Setup,
    methods: list[Method],
    verifier: dict[str, Any],
    path: Path,
    n_seeds: int = 1,
    grid: dict[str, tuple[Any, ...]] | None = None,
) -> None:
    """Coordinate search per method on the validation split, each setting scored by its
    mean over `n_seeds` seeds; writes the tuning JSON."""
    report: dict[str, Any] = {
        "criterion": "mean validation accuracy over the eval points after step 0 (area under "
        "the accuracy-vs-samples curve); ties: final validation accuracy, then candidate order",
        "split": "validation",
        "seed": TUNE_SEED,
        "seeds": tune_seeds(n_seeds),  # this call's; each method records its own below
        "base_overrides": [*setup.base, *setup.extra],
        "start_model": setup.start_model,
        "methods": {},
    }
    if path.is_file():  # keep other methods' results when tuning a subset
        previous = json.loads(path.read_text())
        report["methods"] = previous.get("methods", {})
        for entry in report["methods"].values():  # records from before per-method seeds
            entry.setdefault("seeds", previous.get("seeds", [previous.get("seed", TUNE_SEED)]))
    for method in methods:
        why = missing_resource(method, verifier)
        if why is not None:
            report["methods"][method.name] = {"skipped": why}
            continue
        params = with_verifier(method, method.defaults(), verifier)
        trials: list[dict[str, Any]] = []
        for tunable in method.tunables:
            if grid and tunable.name in grid:  # --tune-grid: a narrower search, recorded
                tunable = dataclasses.replace(tunable, candidates=grid[tunable.name])
            coordinate = tune_coordinate(setup, method, params, tunable, n_seeds)
            trials += coordinate
            best = choose(coordinate)
            if best is not None:
                params[tunable.name] = best["value"]
        chosen = {t.name: params[t.name] for t in method.tunables}
        finished = any(t["score"] is not None for t in trials)
        report["methods"][method.name] = {
            "seeds": tune_seeds(n_seeds),
            "tried": trials,
            "chosen": chosen if finished else None,
        }
        if not finished:
            report["methods"][method.name]["skipped"] = trials[0]["reason"] if trials else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    for name, entry in report["methods"].items():
        print(f"  {name}: chosen {entry.get('chosen')} {entry.get('skipped', '')}")


def evaluate_methods(
    setup: Setup,
    methods: list[Method],
    seeds: int,
    verifier: dict[str, Any],
    tuning: dict[str, Any] | None,
    out: Path,
    command: str,
    target_rule: str = "half-gap",
) -> None:
    """The full (or quick) comparison: seeds x methods, then evals.csv, plot and summary."""
    specs, seed_of, sources = [], {}, {}
    for method in methods:
        params, sources[method.name] = chosen_params(method, tuning)
        params = with_verifier(method, params, verifier)
        for seed in range(seeds):
            out_dir = setup.runs_dir / "eval" / method.name / f"seed{seed}"
            specs.append(run_spec(setup, method, params, seed, "eval", out_dir))
            seed_of[out_dir] = seed
    prerequisites = {
        m.name: why for m in methods if (why := missing_resource(m, verifier)) is not None
    }
    results = run_all(specs, final_accuracy, skip_after_config_error(prerequisites), desc="runs")
    points, diagnostics = collect_points(results, seed_of)
    target, rows = summarize(points, methods, rule=target_rule, diagnostics=diagnostics)
    quality = (
        verifier_quality(setup, Path(verifier["verifier"])) if "verifier" in verifier else None
    )
    out.mkdir(parents=True, exist_ok=True)
    write_evals_csv(points, out / "evals.csv")
    curves = {
        m.label: aggregate_curve(p for p in points if p.method == m.name)
        for m in methods
        if any(p.method == m.name for p in points)
    }
    target_label = "start + half the gap" if target_rule == "half-gap" else "outcome-only final"
    plot_note = plot_curves(
        curves, target, out / "accuracy_vs_samples.png", out.name, target_label=target_label
    )
    meta = {
        "command": command,
        "task": effective_overrides([*TASK_OVERRIDES, *setup.extra]),
        "target_rule": target_rule,
        "start_accuracy": start_accuracy(points),
        "verifier": verifier_line(quality),
        "budget": f"{setup.steps} step(s), eval every {setup.eval_every}, "
        f"{seeds} seed(s) per method",
        "start_model": setup.start_model,
        "hyperparameters": "; ".join(f"{m.name}: {sources[m.name]}" for m in methods),
    }
    text = render_summary(target, rows, not_run_reasons(results), meta)
    if plot_note:
        text += f"\n{plot_note}.\n"
    (out / "summary.md").write_text(text)
    summary = {
        "target": target,
        "target_rule": target_rule,
        "start_accuracy": start_accuracy(points),
        "verifier_quality": quality,
        "rows": [dataclasses.asdict(r) for r in rows],
        "not_run": not_run_reasons(results),
        "command": command,
        "task": effective_overrides([*TASK_OVERRIDES, *setup.extra]),
        "start_model": setup.start_model,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(text)
    print(
        f"wrote {out / 'evals.csv'}, {out / 'summary.md'}"
        + ("" if plot_note else f", {out / 'accuracy_vs_samples.png'}")
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    methods = select_methods(args.methods)
    setup = make_setup(args)
    seeds = args.seeds or (1 if args.quick else 3)
    default_out = (
        setup.runs_dir / "results"
        if args.quick
        else REPO / "benchmarks" / "results" / "sample_efficiency"
    )
    out = (args.out or default_out).resolve()
    tuning_path = (args.tuning or out / "tuning.json").resolve()
    command = " ".join(["benchmarks/sample_efficiency.py", *argv])
    if args.dry_run:
        from benchmarks.launching import command as launch_command

        for method in methods:
            placeholders = {
                "verifier": "<verifier>",
                "prm": "<prm>",
                "prm_control": "<prm>",
                "prm_replay": "<prm_replay>",
            }
            params = with_verifier(method, method.defaults(), placeholders)
            spec = run_spec(
                setup, method, params, 0, "eval", setup.runs_dir / "eval" / method.name / "seed0"
            )
            print(" ".join(launch_command(spec)))
        return 0
    setup = dataclasses.replace(
        setup,
        start_model=start_model_line(prebuild_start_model(CONFIG, [*setup.base, *setup.extra])),
    )
    tuning = json.loads(tuning_path.read_text()) if tuning_path.is_file() else None
    # before any run: a run uses these values, --tune keeps the other methods' ones
    recorded = (tuning or {}).get("start_model")
    why = other_start_model(recorded, setup.start_model, repo_relative(tuning_path))
    if why and not args.allow_other_start_model:
        raise SystemExit(f"error: {why}")
    verifier: dict[str, Any] = {}
    if any(m.needs_verifier for m in methods):
        path, reason = ensure_pav_verifier(setup)
        verifier = {"verifier": str(path)} if path is not None else {"reason": reason}
    for key, given in (("prm", args.prm), ("prm_control", args.prm_control)):
        if given is not None:
            if not given.is_dir():
                raise SystemExit(f"error: --{key.replace('_', '-')} {given}: no such directory")
            verifier[key] = repo_relative(given.resolve())
    if args.prm_replay is not None:
        if not args.prm_replay.exists():
            raise SystemExit(f"error: --prm-replay {args.prm_replay}: no such file")
        verifier["prm_replay"] = repo_relative(args.prm_replay.resolve())
    verifier["prm_threshold"] = args.prm_threshold
    if args.prm_control_threshold is not None:
        verifier["prm_control_threshold"] = args.prm_control_threshold
    if args.tune:
        tune(setup, methods, verifier, tuning_path, args.tune_seeds, parse_grid(args.tune_grid))
        return 0
    for item in args.borrow:
        name, _, source = item.partition("=")
        (method,) = select_methods(name)
        tuning = borrow_tuning(tuning or {}, method, source)
    evaluate_methods(setup, methods, seeds, verifier, tuning, out, command, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
