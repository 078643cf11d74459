"""Rollout backends side by side: transformers `generate` vs a colocated vLLM engine.

Same model, prompts and sampling settings for both, in one run on every rank:
generated tokens per second of each backend (per rank and summed over ranks), and the
weight-sync time as a share of a full training step with the vLLM backend.

    .venv/bin/deepspeed --num_gpus 2 benchmarks/rollout_backends.py \\
        --config configs/quickstart.yaml [--repeats 5] [--steps 5] [key=value ...]

Rank 0 prints a markdown table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per backend")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (vllm)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/rollout_backends.json"))
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def time_generation(backend: Any, model: Any, prompt_ids: list[list[int]], sampling: Any) -> float:
    """Generated tokens per second of one call (all ranks call together)."""
    from rl.engine.deepspeed_engine import barrier

    barrier()
    start = time.perf_counter()
    out = backend.generate_tokens(model, prompt_ids, sampling)
    elapsed = time.perf_counter() - start
    return float(out.response_mask.sum()) / elapsed


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    ranks_here = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_here)))
    import torch

    from rl.config import load_config
    from rl.engine.deepspeed_engine import all_reduce_sum, init_distributed, shutdown
    from rl.rollout.backend import TransformersRollout
    from rl.setup import training_sampling
    from rl.trainer.loop import Trainer

    overrides = [*args.overrides, "rollout.backend=vllm", "output_dir=/tmp/rollout_bench"]
    cfg = load_config(args.config, overrides)
    dist = init_distributed()
    trainer = Trainer(cfg, dist)
    trainer.rollout.sync_weights(trainer.engine)
    rows = trainer.eval_rows[: cfg.rollout.prompts_per_step // dist.world_size]
    prompt_ids = [r.prompt_ids for r in rows for _ in range(cfg.rollout.group_size)]
    sampling = training_sampling(cfg)
    hf = TransformersRollout(
        trainer.tokenizer, cfg.rollout.generation_batch_size, trainer.zero_stage == 3
    )
    backends = {"transformers": hf, "vllm": trainer.rollout}
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for name, backend in backends.items():
        time_generation(backend, trainer.engine.module, prompt_ids, sampling)  # warm-up
        for _ in range(args.repeats):
            rates[name].append(
                time_generation(backend, trainer.engine.module, prompt_ids, sampling)
            )
    sync_share, step_s, sync_s = [], [], []
    for _ in range(args.steps):
        row = trainer.train_step()
        step_s.append(row["time/step_s"])
        sync_s.append(row["time/weight_sync_s"])
        sync_share.append(row["time/weight_sync_s"] / row["time/step_s"])
    summed = {
        name: float(all_reduce_sum(torch.tensor(statistics.median(r)))) for name, r in rates.items()
    }
    result = {
        "world_size": dist.world_size,
        "zero_stage": trainer.zero_stage,
        "sequences_per_rank": len(prompt_ids),
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "temperature": cfg.rollout.temperature,
        "tokens_per_s_per_rank": {name: spread(r) for name, r in rates.items()},
        "tokens_per_s_all_ranks_median": summed,
        "vllm_over_transformers": summed["vllm"] / summed["transformers"],
        "step_s": spread(step_s),
        "weight_sync_s": spread(sync_s),
        "weight_sync_share_of_step": spread(sync_share),
    }
    if dist.is_main:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print("| backend | tokens/s per rank, median (min-max) | tokens/s all ranks |")
        print("|---|---|---|")
        for name, r in rates.items():
            per_rank = f"{statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f})"
            print(f"| {name} | {per_rank} | {summed[name]:.0f} |")
        share = result["weight_sync_share_of_step"]
        print(
            f"weight sync {statistics.median(sync_s) * 1000:.1f} ms = "
            f"{share['median'] * 100:.1f}% of a {statistics.median(step_s):.2f} s step "
            f"(min {share['min'] * 100:.1f}%, max {share['max'] * 100:.1f}%)"
        )
    trainer.rollout.close()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
