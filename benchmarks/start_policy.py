"""Report on a built-in start policy before any RL: where its errors are, how often a group
of samples is all wrong, and how often a wrong chain is right by chance.

    .venv/bin/python benchmarks/start_policy.py [--config configs/quickstart.yaml] \\
        [--split validation] [--n 256] [--samples 8] [--out report.json] [key=value ...]

The overrides are the run's (e.g. `data.task.n_steps=8 data.task.modulus=10
model.tiny.demo_fact_error_rate=0.15`); the start model is built (or found in
`model.cache_dir`) as a run would. On `--n` prompts of `--split` it decodes greedily once
and samples `--samples` responses per prompt at `rollout.temperature`, then reports:

- accuracy (outcome right), clean (every step right) and right-by-chance (outcome right
  with a wrong step) shares, greedy and sampled;
- the histogram of first-error positions of the sampled wrong chains (step index; the
  answer line is index n_steps);
- the share of prompts whose `--samples` responses are all wrong (groups outcome-only
  GRPO cannot learn from).

Runs in one process on the CPU (or the first GPU), no DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--split", default="validation", help="never the eval split's job")
    parser.add_argument("--n", type=int, default=256, help="prompts")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (K)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    return parser.parse_args(argv)


def chain_stats(problems: list[Any], completions: list[str]) -> dict[str, Any]:
    """Outcome / clean / by-chance shares and the first-error positions of `completions`
    (one per entry of `problems`)."""
    from rl.tasks.arith import first_error_step, verify

    right = [verify(c, str(p.answer)) == 1.0 for p, c in zip(problems, completions, strict=True)]
    first = [first_error_step(p, c) for p, c in zip(problems, completions, strict=True)]
    n = max(1, len(problems))
    return {
        "accuracy": sum(right) / n,
        "clean": sum(f < 0 for f in first) / n,
        "right_by_chance": sum(r and f >= 0 for r, f in zip(right, first, strict=True)) / n,
        "first_error_hist": dict(sorted(Counter(f for f in first if f >= 0).items())),
        "right": right,
    }


def sft_record(model_dir: Path) -> dict[str, Any]:
    """A built-in start model's SFT outcome from its build_info.json (final loss and loss
    curve; {} for other models or older builds): a build whose loss is still high or still
    falling fast had not finished learning, and its policy depends on the build."""
    info_path = model_dir / "build_info.json"
    if not info_path.is_file():
        return {}
    info = json.loads(info_path.read_text())
    keys = ("sft_seconds", "final_sft_loss", "sft_loss_curve")
    return {k: info[k] for k in keys if k in info}


def report(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from rl.config import load_config
    from rl.engine.deepspeed_engine import DistInfo
    from rl.engine.models import resolve_model_path
    from rl.engine.start_model import weights_digest
    from rl.rollout.backend import SamplingSettings, TransformersRollout
    from rl.setup import prompt_rows, stop_token_ids
    from rl.tasks.arith import ArithConfig, parse_prompt

    overrides = [*args.overrides, "data.eval=builtin:arith", f"data.eval_split={args.split}"]
    cfg = load_config(args.config, [*overrides, f"data.eval_size={args.n}"])
    path = resolve_model_path(cfg, DistInfo(rank=0, world_size=1, local_rank=0))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows, _ = prompt_rows(cfg, tokenizer, "eval")
    modulus = ArithConfig(**cfg.data.task).modulus
    problems = [parse_prompt(r.columns["prompt"], modulus) for r in rows]
    backend = TransformersRollout(
        tokenizer, 256, synced_gpus=False, stop_token_ids=stop_token_ids(cfg, tokenizer, model)
    )
    ids = [r.prompt_ids for r in rows]
    texts = [r.text for r in rows]
    max_new = cfg.rollout.max_new_tokens
    torch.manual_seed(cfg.seed)
    greedy = backend.rollout(
        model, ids, texts, {}, SamplingSettings(max_new, 1.0, 1.0, greedy=True), 1
    )
    sampled = backend.rollout(
        model, ids, texts, {}, SamplingSettings(max_new, cfg.rollout.temperature, 1.0), args.samples
    )
    g = chain_stats(problems, greedy.completions)
    s = chain_stats([p for p in problems for _ in range(args.samples)], sampled.completions)
    groups = [s["right"][i : i + args.samples] for i in range(0, len(s["right"]), args.samples)]
    return {
        "config": args.config,
        "overrides": args.overrides,
        "model": Path(path).name,  # the cached build's name (no machine path in results)
        "weights_sha256": weights_digest(Path(path)),  # which copy of that build
        "sft": sft_record(Path(path)),
        "split": args.split,
        "prompts": len(rows),
        "samples_per_prompt": args.samples,
        "temperature": cfg.rollout.temperature,
        "greedy": {k: v for k, v in g.items() if k != "right"},
        "sampled": {k: v for k, v in s.items() if k != "right"},
        "all_wrong_group_frac": sum(not any(grp) for grp in groups) / max(1, len(groups)),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = report(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
