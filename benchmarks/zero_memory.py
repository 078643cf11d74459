"""Model-state memory per GPU of the RL setups at scale, from DeepSpeed's own estimators.

What policy + frozen reference + PRM (or critic) need per GPU for 1.5B and 7B models under
ZeRO-2 and ZeRO-3 on 8 GPUs, without offload:

- trained engines (policy, implicit PRM, PPO critic): DeepSpeed's estimate of full model
  states, `deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs` and
  `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs` (the functions the
  `..._all_cold` printers call): ZeRO-2 = 2 P (16-bit params, replicated) + 18 P / N
  (gradients, fp32 master params and Adam moments, partitioned); ZeRO-3 = 18 P / N + the
  estimator's largest-layer allowance 4 L.
- frozen models (reference, PAV verifier): 16-bit parameters only, 2 P replicated under
  ZeRO-2, 2 P / N + 4 L under ZeRO-3 (partitioned like the policy, gathered layer by layer).

Activations, the KV cache of the rollout engine and communication buffers are not included.

    .venv/bin/python benchmarks/zero_memory.py [--gpus 8] [--out memory_estimates.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """A model size for the estimates."""

    name: str
    params: int
    largest_layer: int
    """Parameters of the largest single module (gathered whole under ZeRO-3): the token
    embedding for these shapes (Qwen2.5-like vocabulary of ~152k x hidden size)."""


SHAPES: tuple[ModelShape, ...] = (
    ModelShape("1.5B", 1_500_000_000, 151_936 * 1_536),
    ModelShape("7B", 7_000_000_000, 152_064 * 3_584),
)

SETUPS: dict[str, tuple[str, ...]] = {
    "GRPO (policy only)": ("trained",),
    "PRIME (policy + reference + implicit PRM)": ("trained", "frozen", "trained"),
    "PPO + PAV (policy + critic + PAV verifier)": ("trained", "trained", "frozen"),
}
"""Setups by the kind of each model they hold: `trained` (full model states) or `frozen`."""


def trained_bytes(params: int, largest_layer: int, stage: int, gpus: int) -> int:
    """Per-GPU model states of a trained engine (DeepSpeed's estimators, no offload)."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(
            total_params=params, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False
        )
        return int(gpu)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=params,
            largest_layer_params=largest_layer,
            num_gpus_per_node=gpus,
            num_nodes=1,
            cpu_offload=False,
            cpu_offload_params=False,
            zero_init=True,
        )
        return int(gpu)
    raise ValueError(f"stage must be 2 or 3, got {stage}")


def frozen_bytes(params: int, largest_layer: int, stage: int, gpus: int) -> int:
    """Per-GPU 16-bit parameters of a frozen model (replicated / partitioned)."""
    if stage == 2:
        return 2 * params
    if stage == 3:
        return 2 * params // gpus + 4 * largest_layer
    raise ValueError(f"stage must be 2 or 3, got {stage}")


@dataclass(frozen=True)
class Estimate:
    """One line of the estimates table (bytes per GPU)."""

    model: str
    stage: int
    setup: str
    parts: tuple[tuple[str, int], ...]
    """(kind, bytes) of each model in the setup."""

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)


def estimates(
    shapes: tuple[ModelShape, ...] = SHAPES, gpus: int = 8, stages: tuple[int, ...] = (2, 3)
) -> list[Estimate]:
    """Every (model size, setup, stage) combination."""
    out = []
    for shape in shapes:
        for setup, kinds in SETUPS.items():
            for stage in stages:
                parts = []
                for kind in kinds:
                    fn = trained_bytes if kind == "trained" else frozen_bytes
                    parts.append((kind, fn(shape.params, shape.largest_layer, stage, gpus)))
                out.append(Estimate(shape.name, stage, setup, tuple(parts)))
    return out


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def render_estimates(rows: list[Estimate], gpus: int) -> str:
    """The markdown table: per-GPU GiB of each model and the total."""
    lines = [
        f"| model | setup | ZeRO | trained engine(s), GiB each | frozen model(s), GiB each "
        f"| total per GPU, GiB ({gpus} GPUs) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        trained = [gib(b) for k, b in r.parts if k == "trained"]
        frozen = [gib(b) for k, b in r.parts if k == "frozen"]
        lines.append(
            f"| {r.model} | {r.setup} | {r.stage} | {' + '.join(trained) or '-'} "
            f"| {' + '.join(frozen) or '-'} | {gib(r.total)} |"
        )
    return "\n".join(lines) + "\n"


def deepspeed_printout(shapes: tuple[ModelShape, ...], gpus: int) -> str:
    """What DeepSpeed's `..._all_cold` estimators print for these shapes (all offload
    options), for checking the table against the library's own output."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        for shape in shapes:
            print(f"--- {shape.name}, ZeRO-2")
            estimate_zero2_model_states_mem_needs_all_cold(
                total_params=shape.params, num_gpus_per_node=gpus, num_nodes=1
            )
            print(f"--- {shape.name}, ZeRO-3")
            estimate_zero3_model_states_mem_needs_all_cold(
                total_params=shape.params,
                largest_layer_params=shape.largest_layer,
                num_gpus_per_node=gpus,
                num_nodes=1,
            )
    return buf.getvalue()


def render_document(gpus: int = 8, shapes: tuple[ModelShape, ...] = SHAPES) -> str:
    """memory_estimates.md."""
    doc = (__doc__ or "").split("\n\n    .venv")[0].split("\n", 2)[2].strip()
    return (
        "# Model-state memory per GPU (DeepSpeed estimators)\n\n"
        + doc
        + "\n\nShapes: "
        + "; ".join(
            f"{s.name}: {s.params:,} params, largest layer {s.largest_layer:,}" for s in shapes
        )
        + ".\n\n"
        + render_estimates(estimates(shapes, gpus), gpus)
        + "\nPPO + PAV and GRPO as configured here use no KL reference (`algo.kl_coef=0`); "
        "with one, add a frozen model.\n\nDeepSpeed's own printout "
        "(`estimate_zero{2,3}_model_states_mem_needs_all_cold`; its `GB` are GiB, 2^30 bytes; "
        "the table uses the per-GPU column of the no-offload rows):\n\n```\n"
        + deepspeed_printout(shapes, gpus)
        + "```\n"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = render_document(args.gpus)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
