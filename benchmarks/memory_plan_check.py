"""The dry-run memory plan (`rl.engine.memory_plan`) against the peak GPU memory measured on
one H200 (`benchmarks/results/gpu/`, 2026-12-04): the same configurations as
`scripts/gpu_check.sh` ran them with GPUS=1, STEPS=4, each case's plan beside the largest
`mem/<phase>_peak_gpu_mb` its metrics logged (torch's `max_memory_allocated`, so the CUDA
context and NCCL are outside both).

The plans use the runs' real prompt lengths (their tokenizers on their prompts; the trainer
trims padding, so the config's `data.max_prompt_tokens` bound would overstate them) and
`rollout.max_new_tokens` as the response length (the throughput run's responses all reached
it). The throughput case ran random Qwen2-1.5B weights, the shape of Qwen2.5-1.5B in
`KNOWN_ARCHITECTURES` (tests/test_memory_plan.py checks the two agree).

    .venv/bin/python benchmarks/memory_plan_check.py [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rl.config import Config, load_config
from rl.engine.memory_plan import (
    KNOWN_ARCHITECTURES,
    Architecture,
    MemoryPlan,
    WorldSize,
    architecture_for,
    build_plan,
)

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "benchmarks" / "results" / "gpu" / "metrics"
TOLERANCE = 0.25
"""The plan's target: within 25% of the measured peak."""

GPU_CHECK_COMMON = ("rollout.prompts_per_step=4", "data.eval_size=16")
"""`scripts/gpu_check.sh`'s `common` overrides that change memory, with GPUS=1."""


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    name: str
    config: str
    overrides: tuple[str, ...]
    metrics: str
    """File under benchmarks/results/gpu/metrics/."""
    architecture: str | None = None
    """A `KNOWN_ARCHITECTURES` name for a model the config names by a path that is not here."""
    tokenizer: str | None = None
    """Directory of the tokenizer the run used, when its model.path is not here."""


CASES: tuple[Case, ...] = (
    Case(
        "zero2-transformers",
        "configs/quickstart.yaml",
        (*GPU_CHECK_COMMON, "deepspeed.zero_stage=2"),
        "zero2-transformers.jsonl",
    ),
    Case(
        "zero3-transformers",
        "configs/quickstart.yaml",
        (*GPU_CHECK_COMMON, "deepspeed.zero_stage=3"),
        "zero3-transformers.jsonl",
    ),
    Case(
        "zero3-offload",
        "configs/quickstart.yaml",
        (
            *GPU_CHECK_COMMON,
            "deepspeed.config=configs/deepspeed/zero3_offload.json",
            "algo.kl_coef=0.01",
        ),
        "zero3-offload.jsonl",
    ),
    Case(
        "chat-bf16-transformers",
        "configs/quickstart_chat.yaml",
        (*GPU_CHECK_COMMON, "rollout.backend=transformers"),
        "chat-bf16-transformers.jsonl",
    ),
    Case(
        "throughput (Qwen2-1.5B, ZeRO-2)",
        "configs/quickstart.yaml",
        (
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            "rollout.max_new_tokens=512",
            "rollout.prompts_per_step=8",
            "rollout.group_size=8",
            "trainer.micro_batch_size=8",
            "deepspeed.zero_stage=2",
            "rollout.backend=transformers",
        ),
        "throughput_qwen2-1.5b_zero2-transformers.jsonl",
        architecture="Qwen/Qwen2.5-1.5B",
        tokenizer="chat-tiny",  # random_model.py saves builtin:chat-tiny's tokenizer
    ),
)


def measured_peaks_mib(path: Path) -> dict[str, float]:
    """Largest `mem/rollout_peak_gpu_mb` and `mem/update_peak_gpu_mb` over a run's steps."""
    peaks = {"rollout": 0.0, "update": 0.0}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for phase in peaks:
            value = row.get(f"mem/{phase}_peak_gpu_mb")
            if value is not None:
                peaks[phase] = max(peaks[phase], float(value))
    return peaks


def tokenizer_dir(cfg: Config, case: Case) -> Path:
    """The directory whose tokenizer the run used: the shipped start model of the config's
    recipe, or any shipped copy of `case.tokenizer`'s kind (the tokenizer is the kind's,
    whatever the recipe's size or SFT steps)."""
    from rl.engine.start_model import SHIPPED_ROOT, shipped_model_dir
    from rl.engine.tiny_config import TinyModelConfig

    if case.tokenizer is not None:
        shipped = next(iter(sorted(SHIPPED_ROOT.glob(f"{case.tokenizer}-*"))), None)
    else:
        kind = cfg.model.path.removeprefix("builtin:")
        shipped = shipped_model_dir(TinyModelConfig(**cfg.model.tiny), kind)
    if shipped is None:
        raise FileNotFoundError(f"{case.name}: no shipped start model to read its tokenizer")
    return shipped


def longest_prompt_tokens(cfg: Config, case: Case, rows: int = 256) -> int:
    """Longest of the first `rows` training prompts, tokenised as the trainer does."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from rl.setup import prompt_rows

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(cfg, case))
    sample = replace(cfg, data=replace(cfg.data, train_size=rows))
    prepared, _ = prompt_rows(sample, tok, "train")
    return max(len(r.prompt_ids) for r in prepared)


@dataclass(frozen=True)
class Comparison:
    """One case and phase: the plan's bytes against the measured MiB."""

    case: str
    phase: str
    estimate_mib: float
    measured_mib: float
    estimate_other_gc_mib: float | None
    """The update phase with the other gradient-checkpointing setting (None: rollout)."""

    @property
    def error(self) -> float:
        """(estimate - measured) / measured."""
        return self.estimate_mib / self.measured_mib - 1.0


def case_plans(case: Case) -> tuple[MemoryPlan, MemoryPlan]:
    """The case's plan, and the same with gradient checkpointing switched the other way."""
    cfg = load_config(REPO / case.config, list(case.overrides))
    arch: Architecture = (
        KNOWN_ARCHITECTURES[case.architecture]
        if case.architecture
        else architecture_for(cfg.model.path, cfg.model.tiny)
    )
    world = WorldSize(1, 1, "the GPU check: 1 GPU")
    prompt = longest_prompt_tokens(cfg, case)
    flipped = load_config(
        REPO / case.config,
        [
            *case.overrides,
            f"model.gradient_checkpointing={str(not cfg.model.gradient_checkpointing).lower()}",
        ],
    )
    return build_plan(cfg, arch, world, prompt_tokens=prompt), build_plan(
        flipped, arch, world, prompt_tokens=prompt
    )


def compare(cases: tuple[Case, ...] = CASES) -> list[Comparison]:
    """Every case's rollout and update phase, estimate against measurement."""
    out = []
    for case in cases:
        plan, other = case_plans(case)
        measured = measured_peaks_mib(RESULTS / case.metrics)
        for phase in ("rollout", "update"):
            out.append(
                Comparison(
                    case.name,
                    phase,
                    plan.phase_bytes(phase) / 2**20,
                    measured[phase],
                    other.phase_bytes(phase) / 2**20 if phase == "update" else None,
                )
            )
    return out


def render(rows: list[Comparison]) -> str:
    """Markdown table of the comparison."""
    lines = [
        "| case | phase | estimate, MiB | measured, MiB | error | update with the other "
        "gradient-checkpointing setting, MiB (error) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        other = ""
        if r.estimate_other_gc_mib is not None:
            err = r.estimate_other_gc_mib / r.measured_mib - 1.0
            other = f"{r.estimate_other_gc_mib:,.0f} ({err:+.0%})"
        lines.append(
            f"| {r.case} | {r.phase} | {r.estimate_mib:,.0f} | {r.measured_mib:,.0f} "
            f"| {r.error:+.0%} | {other} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    text = render(compare())
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
