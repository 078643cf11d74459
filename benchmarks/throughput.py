"""Training-step throughput per phase: ZeRO-2 vs ZeRO-3, transformers vs vLLM, +/- a PRM.

One run per configuration in `CONFIGS` (same model, prompts and batch), each a
`deepspeed --num_gpus 2 launch/train_rl.py` subprocess. From the trainer's per-step metrics
(the first `--warmup` steps dropped) it reports, per phase of a step, the mean time and
tokens/s, and every configuration's ratio to the baseline (ZeRO-2, transformers, no head):

    rollout      time/rollout_s      generation
    heads        time/heads_s        reward heads, PRM scoring and its update included
    credit       time/reward_s - time/heads_s + time/credit_s   outcome scoring, advantages
    update       time/logprobs_s + time/update_s   old log-probs + optimizer steps
    weight_sync  time/weight_sync_s  policy weights into the vLLM engine

Tokens are generated response tokens: train/response_tokens_mean x samples per step (all
ranks); a phase's tokens/s is those tokens over its mean time.

Memory, two sources: per phase, the trainer's `mem/<phase>_peak_rss_mb` (and
`mem/<phase>_peak_gpu_mb` on CUDA): the peak within the phase, max over ranks, here the max
over the timed steps (phases rollout, reward = heads + credit, update, weight_sync); per run,
the peak resident memory of each rank process over its whole life (VmHWM from /proc, polled
from outside; includes model loading and evaluation). On CUDA it also reports the MFU of the
update phase: 6 x params x tokens / update time / (ranks x peak bf16 dense FLOPs).

    .venv/bin/python benchmarks/throughput.py [--quick] [--configs zero2-transformers,...]

Writes throughput.csv (columns: `CSV_COLUMNS`), throughput.md and memory_estimates.md
(`benchmarks/zero_memory.py`) into --out (default benchmarks/results/throughput/).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.launching import (
    RUN_DEFAULTS,
    RunResult,
    RunSpec,
    prebuild_start_model,
    read_jsonl,
    run_all,
    step_rows,
)

REPO = Path(__file__).resolve().parent.parent

CONFIG = "configs/quickstart.yaml"

PRM_OVERRIDES: tuple[str, ...] = (
    "reward.heads=[{head: implicit_prm, kwargs: {beta: 0.05, lr: 1.0e-4, update: after}}]",
    "algo.credit=prime",
)

QUICK_OVERRIDES: tuple[str, ...] = (
    "model.tiny.hidden_size=64",
    "model.tiny.num_heads=2",  # head_dim 32: vLLM CPU attention rejects head_dim 16
    "model.tiny.num_layers=2",
    "model.tiny.intermediate_size=128",
    "model.tiny.sft_steps=60",
    "data.train_size=256",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "trainer.micro_batch_size=8",
)

PHASES: tuple[tuple[str, str], ...] = (
    ("rollout", "time/rollout_s"),
    ("heads", "time/heads_s"),
    ("credit", "time/reward_s"),  # minus heads, see phase_times
    ("update", "time/update_s"),
    ("weight_sync", "time/weight_sync_s"),
    ("step", "time/step_s"),
)

PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}
"""Dense bf16 peak per GPU by a substring of the device name (no sparsity)."""

MIN_RATIO_BASE_S = 1e-3
"""Phase times of the baseline below this (e.g. weight sync without vLLM: microseconds) get
no ratio in throughput.md."""

MEM_PHASES: tuple[str, ...] = ("rollout", "reward", "update", "weight_sync")
"""Phases the trainer logs `mem/<phase>_peak_rss_mb` for (`reward` includes the heads)."""

TOKEN_PHASES: tuple[str, ...] = ("rollout", "heads", "update", "step")
"""Phases whose tokens/s is reported (credit and weight sync do not scale with tokens)."""

CSV_COLUMNS: tuple[str, ...] = (
    "config",
    "zero_stage",
    "backend",
    "prm",
    "status",
    "reason",
    "timed_steps",
    "samples_per_step",
    "tokens_per_step",
    *(f"{phase}_s" for phase, _ in PHASES),
    *(f"{phase}_tokens_per_s" for phase in TOKEN_PHASES),
    "step_s_vs_baseline",
    "tokens_per_s_vs_baseline",
    *(f"{phase}_peak_rss_mb" for phase in MEM_PHASES),
    *(f"{phase}_peak_gpu_mb" for phase in MEM_PHASES),
    "run_peak_rss_mb_max_rank",
    "run_peak_rss_mb_per_rank",
    "update_mfu",
)
"""throughput.csv: configuration name, ZeRO stage, rollout backend, implicit PRM head on;
ok / skipped and why; steps averaged; samples and generated response tokens per step (all
ranks); mean seconds per phase (see the module docstring); tokens/s of the rollout, heads
(empty without heads) and update phases and of the whole step; the step time and tokens/s
relative to the baseline; per phase, the trainer's peak resident and GPU memory (MiB, max
over ranks and timed steps; empty where not logged); the whole run's peak resident memory
(MiB) of the largest rank and of each rank (`rank0=..;rank1=..`, `other=` the sum of the
peaks of processes the ranks started); MFU of the update phase (CUDA only, else empty)."""


@dataclass(frozen=True)
class ThroughputConfig:
    """One configuration to time."""

    zero_stage: int
    backend: str
    prm: bool

    @property
    def name(self) -> str:
        return f"zero{self.zero_stage}-{self.backend}" + ("-prm" if self.prm else "")

    def overrides(self) -> list[str]:
        backend = DECODING.get(self.backend, self.backend)
        out = [f"deepspeed.zero_stage={self.zero_stage}", f"rollout.backend={backend}"]
        return out + (list(PRM_OVERRIDES) if self.prm else [])


DECODING: dict[str, str] = {
    "transformers-static": "{name: transformers, cache: static}",
    "transformers-compiled": "{name: transformers, cache: static, compile: true}",
}
"""Backends that are the transformers backend with a faster decoding setting."""

CONFIGS: tuple[ThroughputConfig, ...] = tuple(
    ThroughputConfig(stage, backend, prm)
    for backend in ("transformers", "vllm")
    for prm in (False, True)
    for stage in (2, 3)
) + tuple(ThroughputConfig(2, backend, False) for backend in DECODING)
BASELINE = "zero2-transformers"


# ----------------------------------------------------------------------------------- pure


def phase_times(rows: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Mean seconds per phase over the step rows after the first `warmup` (all rows when
    there are not more). `heads` is 0 without heads; `credit` excludes the heads' time."""
    steps = step_rows(rows)
    if len(steps) > warmup:
        steps = steps[warmup:]
    if not steps:
        raise ValueError("no training-step rows")
    out = {}
    for phase, key in PHASES:
        values = [float(r.get(key, 0.0) or 0.0) for r in steps]
        if phase == "credit":
            heads = [float(r.get("time/heads_s", 0.0) or 0.0) for r in steps]
            credit = [float(r.get("time/credit_s", 0.0) or 0.0) for r in steps]
            values = [v - h + c for v, h, c in zip(values, heads, credit, strict=True)]
        if phase == "update":
            logprobs = [float(r.get("time/logprobs_s", 0.0) or 0.0) for r in steps]
            values = [v + lp for v, lp in zip(values, logprobs, strict=True)]
        out[phase] = statistics.fmean(values)
    return out


def tokens_per_step(rows: list[dict[str, Any]], warmup: int) -> tuple[float, float, int]:
    """(samples per step, mean generated response tokens per step over all ranks, timed
    steps) from `samples` / `step` and `train/response_tokens_mean`."""
    steps = step_rows(rows)
    if len(steps) > warmup:
        steps = steps[warmup:]
    if not steps:
        raise ValueError("no training-step rows")
    per_step = float(steps[-1]["samples"]) / float(steps[-1]["step"])
    tokens = statistics.fmean(float(r["train/response_tokens_mean"]) * per_step for r in steps)
    return per_step, tokens, len(steps)


def trainer_memory(rows: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """`{phase}_peak_rss_mb` / `{phase}_peak_gpu_mb`: max over the step rows after the first
    `warmup` of the trainer's `mem/<phase>_peak_*_mb` ({} when it logs none)."""
    steps = step_rows(rows)
    if len(steps) > warmup:
        steps = steps[warmup:]
    out: dict[str, float] = {}
    for r in steps:
        for key, value in r.items():
            if key.startswith("mem/") and isinstance(value, (int, float)):
                name = key[len("mem/") :]
                out[name] = max(out.get(name, -math.inf), float(value))
    return out


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device by name; None when unknown."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return flops
    return None


def mfu(params: int, tokens: float, seconds: float, peak: float, devices: int) -> float:
    """Model FLOPs utilisation: 6 x params x tokens / seconds / (devices x peak)."""
    return 6.0 * params * tokens / seconds / (devices * peak)


def measure(
    config: ThroughputConfig, rows: list[dict[str, Any]], peak_rss_mb: dict[str, float], warmup: int
) -> dict[str, Any]:
    """One CSV row (without ratios and MFU) of a finished run."""
    times = phase_times(rows, warmup)
    samples, tokens, n = tokens_per_step(rows, warmup)
    row: dict[str, Any] = {
        "config": config.name,
        "zero_stage": config.zero_stage,
        "backend": config.backend,
        "prm": config.prm,
        "status": "ok",
        "reason": "",
        "timed_steps": n,
        "samples_per_step": samples,
        "tokens_per_step": tokens,
    }
    for phase, _ in PHASES:
        row[f"{phase}_s"] = times[phase]
        if phase in TOKEN_PHASES:
            row[f"{phase}_tokens_per_s"] = tokens / times[phase] if times[phase] > 0 else math.nan
    logged = trainer_memory(rows, warmup)
    for phase in MEM_PHASES:
        for kind in ("rss", "gpu"):
            row[f"{phase}_peak_{kind}_mb"] = logged.get(f"{phase}_peak_{kind}_mb", math.nan)
    ranks = {k: v for k, v in peak_rss_mb.items() if k.startswith("rank")}
    row["run_peak_rss_mb_max_rank"] = max(ranks.values()) if ranks else math.nan
    row["run_peak_rss_mb_per_rank"] = ";".join(f"{k}={v:.0f}" for k, v in peak_rss_mb.items())
    return row


def skipped_row(config: ThroughputConfig, status: str, reason: str) -> dict[str, Any]:
    return {
        "config": config.name,
        "zero_stage": config.zero_stage,
        "backend": config.backend,
        "prm": config.prm,
        "status": status,
        "reason": reason,
    }


def add_ratios(rows: list[dict[str, Any]], baseline: str = BASELINE) -> None:
    """Step time and step tokens/s relative to the baseline row (in place; NaN without it)."""
    base = next((r for r in rows if r["config"] == baseline and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok" or base is None:
            r["step_s_vs_baseline"] = r["tokens_per_s_vs_baseline"] = math.nan
            continue
        r["step_s_vs_baseline"] = r["step_s"] / base["step_s"]
        r["tokens_per_s_vs_baseline"] = r["step_tokens_per_s"] / base["step_tokens_per_s"]


def fmt(value: float) -> str:
    """Three significant-ish digits: `1,257`, `12.35`, `0.198`."""
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def ratio_text(value: float, base: float | None, min_base: float = 0.0) -> str:
    """`0.512 (1.23x)`: a value and its ratio to the baseline's; no ratio where the
    baseline is missing, NaN or not above `min_base` (a phase that takes no time)."""
    if base is None or math.isnan(base) or base <= min_base or math.isnan(value):
        return fmt(value)
    return f"{fmt(value)} ({value / base:.2f}x)"


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """throughput.md: per-phase seconds (ratio to the baseline), tokens/s and memory."""
    base = next((r for r in rows if r["config"] == BASELINE and r["status"] == "ok"), None)
    lines = [
        "# Training-step throughput per phase",
        "",
        f"Command: `{meta.get('command', '')}`  ",
        f"Setup: {meta.get('setup', '')}  ",
        f"Baseline for ratios: {BASELINE} (ZeRO-2, transformers rollouts, no reward head).",
        "",
        "Mean seconds per step and phase over the timed steps, (ratio to the baseline):",
        "",
        "| config | rollout | heads (PRM incl. update) | credit | update | weight sync | step "
        "| tokens/s (step) | rollout tokens/s | heads tokens/s | update tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        cells = [
            ratio_text(r[f"{phase}_s"], base[f"{phase}_s"] if base else None, MIN_RATIO_BASE_S)
            for phase in ("rollout", "heads", "credit", "update", "weight_sync", "step")
        ]
        tok = [
            ratio_text(r[f"{phase}_tokens_per_s"], base[f"{phase}_tokens_per_s"] if base else None)
            for phase in ("step", "rollout", "heads", "update")
        ]
        lines.append(f"| {r['config']} | " + " | ".join(cells + tok) + " |")
    lines += [
        "",
        "Peak resident memory, MiB (ratio to the baseline): per phase from the trainer's "
        "`mem/<phase>_peak_rss_mb` (max over ranks and timed steps; `-` where not logged), and "
        "over each rank's whole run measured from outside (VmHWM):",
        "",
        "| config | rollout | reward (heads incl.) | update | weight sync "
        "| whole run, largest rank | whole run, per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        cells = [
            ratio_text(r[key], base[key] if base else None)
            for key in [*(f"{p}_peak_rss_mb" for p in MEM_PHASES), "run_peak_rss_mb_max_rank"]
        ]
        lines.append(
            f"| {r['config']} | " + " | ".join(cells) + f" | {r['run_peak_rss_mb_per_rank']} |"
        )
    if any(not math.isnan(r.get("update_peak_gpu_mb", math.nan)) for r in ok):
        lines += ["", "Peak GPU memory allocated per phase, MiB (max over ranks):", ""]
        lines += ["| config | " + " | ".join(MEM_PHASES) + " |", "|---|---|---|---|---|"]
        for r in ok:
            cells = [fmt(r[f"{p}_peak_gpu_mb"]) for p in MEM_PHASES]
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    if any(r.get("update_mfu") for r in ok):
        lines += ["", "| config | update-phase MFU |", "|---|---|"]
        lines += [
            f"| {r['config']} | {100 * r['update_mfu']:.1f}% |" for r in ok if r.get("update_mfu")
        ]
    not_ok = [r for r in rows if r["status"] != "ok"]
    if not_ok:
        lines += ["", "Not measured (status: the error):", ""]
        lines += [f"- {r['config']}: {r['status']}: {r['reason']}" for r in not_ok]
    lines += [
        "",
        "Tokens are generated response tokens (all ranks) per step; a phase's tokens/s is "
        "those tokens over the phase's mean time. `heads` includes the implicit PRM's forward "
        "passes and its optimizer step; `credit` is outcome scoring plus advantages. Whole-run "
        "peak RSS includes model loading and evaluation, so it bounds every phase from above.",
        "",
    ]
    return "\n".join(lines)


def csv_value(value: Any) -> Any:
    """Floats to 6 significant digits, NaN as an empty cell."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: csv_value(v) for k, v in r.items()})


# ----------------------------------------------------------------------------------- driving


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, 3 steps")
    parser.add_argument("--configs", default=None, help="comma-separated names (default all)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (12; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps not timed (2; quick 1)")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--runs-dir", type=Path, default=None, help="run output directories")
    parser.add_argument("--cache-dir", default=None, help="start-model cache (model.cache_dir)")
    parser.add_argument("--ranks", type=int, default=2, help="deepspeed --num_gpus")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs for memory_estimates.md")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    return parser.parse_args(argv)


def select_configs(names: str | None) -> list[ThroughputConfig]:
    """`--configs a,b` (baseline first when selected); all when None."""
    if not names:
        return sorted(CONFIGS, key=lambda c: c.name != BASELINE)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {c.name: c for c in CONFIGS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; valid: {sorted(known)}")
    return [known[n] for n in wanted]


def model_params(model_dir: Path | None, config: str, overrides: list[str]) -> int:
    """Parameters of the policy (counted on the meta device, no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_dir is None:
        from rl.config import load_config

        model_dir = Path(load_config(REPO / config, overrides).model.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def cuda_device() -> str | None:
    """The CUDA device name, None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    configs = select_configs(args.configs)
    steps = args.steps or (3 if args.quick else 12)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    runs_dir = (
        args.runs_dir
        or REPO / "benchmarks" / "runs" / ("throughput_quick" if args.quick else "throughput")
    ).resolve()
    default_out = runs_dir / "results" if args.quick else REPO / "benchmarks/results/throughput"
    out = (args.out or default_out).resolve()
    base = [*(QUICK_OVERRIDES if args.quick else ())]
    base += [f"trainer.max_steps={steps}", "trainer.eval_every=0", "data.eval_size=32"]
    if args.cache_dir:
        base.append(f"model.cache_dir={Path(args.cache_dir).resolve()}")
    base += args.overrides
    model_dir = prebuild_start_model(CONFIG, base)
    specs = [
        RunSpec(
            name=c.name,
            out_dir=runs_dir / c.name,
            overrides=(*RUN_DEFAULTS, *base, *c.overrides()),
            max_steps=steps,
            config=CONFIG,
            ranks=args.ranks,
            group=c.name,
        )
        for c in configs
    ]
    results: list[RunResult] = run_all(specs, desc="throughput")
    rows = []
    for config, result in zip(configs, results, strict=True):
        if not result.ok:  # e.g. vLLM not installable or unsupported here
            rows.append(skipped_row(config, result.status, result.reason))
            continue
        metrics = read_jsonl(result.spec.out_dir / "metrics.jsonl")
        rows.append(measure(config, metrics, result.peak_rss_mb, warmup))
    add_ratios(rows)
    device = cuda_device()
    peak = peak_flops(device) if device else None
    if device and peak:
        params = model_params(model_dir, CONFIG, base)
        for r in rows:
            if r["status"] == "ok":
                r["update_mfu"] = mfu(params, r["tokens_per_step"], r["update_s"], peak, args.ranks)
    setup = (
        f"{'quick: tiny model, ' if args.quick else ''}{steps} steps, first {warmup} not timed, "
        f"{args.ranks} ranks, {device or 'CPU'}"
    )
    meta = {"command": " ".join(["benchmarks/throughput.py", *argv]), "setup": setup}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "throughput.csv")
    text = render_markdown(rows, meta)
    (out / "throughput.md").write_text(text)
    from benchmarks.zero_memory import render_document

    (out / "memory_estimates.md").write_text(render_document(args.gpus))
    print(text)
    if device and peak:
        print(f"update-phase MFU on {device} (peak {peak / 1e12:.0f} TFLOP/s bf16 dense):")
        for r in rows:
            if r.get("update_mfu"):
                print(f"  {r['config']}: {100 * r['update_mfu']:.2f}%")
    print(f"wrote {out / 'throughput.csv'}, {out / 'throughput.md'}, {out / 'memory_estimates.md'}")
    return exit_status(rows)


def exit_status(rows: list[dict[str, Any]]) -> int:
    """0 when at least one configuration was measured; 1 when none was (every run failed),
    so a caller such as scripts/gpu_check.sh sees the failure. A configuration that cannot
    run here (vLLM not installed) beside measured ones is reported in the table, not as a
    failure."""
    if any(r["status"] == "ok" for r in rows):
        return 0
    print("error: no configuration was measured (see 'Not measured' above)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
