"""Evaluate a process reward head ProcessBench-style: predict each solution's first wrong step.

    python launch/eval_prm.py --config configs/quickstart.yaml --head pav \\
        --head-kwargs '{path: runs/pav/verifier}' [--data builtin | --data file.jsonl] \\
        [--n 512] [--threshold 0.5 | --tune-threshold-on validation] [--out results.json] \\
        [key=value ...]

--head: a registered head or `package.module:ClassName` (default: the config's first
`reward.heads` entry, with its kwargs). --data builtin: labelled solutions of the built-in
arithmetic task (`data.task`, split --split, exact labels, half of them with one error);
a .jsonl file: ProcessBench rows {problem, steps, label}. The head predicts the first step
whose estimated P(still correct) is below --threshold (-1: none); the table shows the
accuracy on wrong solutions, on right ones and their harmonic mean (F1) next to the
constant predictors. --tune-threshold-on SPLIT (built-in data only) first scores the head on
that split's labelled solutions and uses the threshold with the best F1 there (a grid of
0.01 .. 0.99): a value model of a weak policy, such as PAV's, sits below 0.5 on every step.
Steps are joined with `reward.step_delimiter`; ProcessBench's steps are paragraphs: pass
'reward.step_delimiter="\\n\\n"' (YAML double quotes, so that \\n is a newline). See
rl/eval/prm.py for how a head's per-step values are read.

Runs as one process (plain `python`): torch.distributed is initialised as a world of one,
since heads may build DeepSpeed engines in `setup`. Overrides are dotted config keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl.cli import config_parser, guarded, set_process_defaults  # noqa: E402  (no torch)

BUILTIN_DATA = ("builtin", "builtin:arith")
"""--data values that mean the built-in task's labelled solutions."""

BUILTIN_N = 512
"""Default number of built-in labelled solutions."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--head", default=None, help="registered name or package.module:Class")
    parser.add_argument("--head-kwargs", default=None, help="YAML mapping of head kwargs")
    parser.add_argument("--data", default="builtin", help="'builtin' or a ProcessBench .jsonl")
    parser.add_argument("--split", default="eval", help="built-in task split (default: eval)")
    parser.add_argument(
        "--n", type=int, default=None, help="solutions (builtin: 512; a file: all, or the first n)"
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="P(correct) cut-off (default 0.5)"
    )
    parser.add_argument(
        "--tune-threshold-on",
        default=None,
        metavar="SPLIT",
        help="built-in data: choose the threshold with the best F1 on this split",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="solutions per batch (trainer.micro_batch_size)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def head_spec(args: argparse.Namespace, cfg: Any) -> tuple[str, dict[str, Any]]:
    """(head spec, kwargs) from --head/--head-kwargs, else the config's first head."""
    import yaml

    from rl.core.errors import ConfigError

    if args.head is None:
        if args.head_kwargs is not None:
            raise ConfigError("--head-kwargs needs --head")
        if not cfg.reward.heads:
            raise ConfigError("no head to evaluate: pass --head or configure reward.heads")
        first = cfg.reward.heads[0]
        return first.head, dict(first.kwargs)
    try:
        kwargs = yaml.safe_load(args.head_kwargs) if args.head_kwargs else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--head-kwargs: not YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--head-kwargs: expected a mapping, got {kwargs!r}")
    return args.head, kwargs


def load_labelled(args: argparse.Namespace, cfg: Any) -> list[dict[str, Any]]:
    """The labelled solutions of --data."""
    from rl.core.errors import ConfigError
    from rl.eval import prm as prm_eval
    from rl.tasks import arith

    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    if args.data in BUILTIN_DATA:
        if cfg.reward.step_delimiter != arith.STEP_DELIMITER:
            raise ConfigError(
                f"reward.step_delimiter is {cfg.reward.step_delimiter!r} but the built-in "
                f"task's steps are lines ({arith.STEP_DELIMITER!r})"
            )
        n = BUILTIN_N if args.n is None else args.n
        return prm_eval.builtin_labelled_solutions(cfg.data.task, args.split, n, cfg.seed)
    return prm_eval.load_processbench_jsonl(args.data, args.n)


def check_threshold_args(args: argparse.Namespace) -> None:
    """ConfigError naming the flag when --tune-threshold-on cannot be honoured."""
    from rl.core.errors import ConfigError
    from rl.tasks import arith

    split = args.tune_threshold_on
    if split is None:
        return
    if args.threshold is not None:
        raise ConfigError("--threshold and --tune-threshold-on exclude each other")
    if args.data not in BUILTIN_DATA:
        raise ConfigError("--tune-threshold-on needs --data builtin (labelled solutions per split)")
    if split not in arith.SPLITS:
        raise ConfigError(f"--tune-threshold-on: unknown split {split!r}; valid: {arith.SPLITS}")
    if split == args.split:
        raise ConfigError(
            f"--tune-threshold-on {split} is the split being scored; tune on another one"
        )


def policy_tokenizer(cfg: Any, dist: Any) -> tuple[Any, str]:
    """(tokenizer, resolved start-policy path); the builtin model is built if not cached."""
    from transformers import AutoTokenizer

    from rl.core.errors import ConfigError
    from rl.engine.models import resolve_model_path

    path = resolve_model_path(cfg, dist)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"model.path: cannot load a tokenizer from {path!r}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, path


def build_head(
    spec: str,
    kwargs: dict[str, Any],
    *,
    cfg: Any,
    dist: Any,
    tokenizer: Any,
    policy_path: str,
    batch_size: int,
) -> Any:
    """The head after `setup(HeadContext)` (no policy, rollout or verifier; a batch of
    `batch_size` solutions is one forward micro-batch)."""
    from rewards.build import resolve_head
    from rewards.heads import HeadContext
    from rl.engine.deepspeed_engine import build_ds_config, use_bf16

    head = resolve_head(spec, kwargs)
    ds_config = build_ds_config(
        cfg.deepspeed.config,
        zero_stage=cfg.deepspeed.zero_stage,
        micro_batch_size=batch_size,
        grad_accum_steps=1,
        world_size=dist.world_size,
        max_grad_norm=cfg.optim.max_grad_norm,
        bf16=use_bf16(cfg.model.dtype),
    )
    head.setup(
        HeadContext(
            cfg=cfg,
            dist=dist,
            tokenizer=tokenizer,
            policy_path=policy_path,
            ds_config=ds_config,
            micro_batch_size=batch_size,
            local_batch_size=batch_size,
            offload_references=cfg.model.offload_references,
        )
    )
    return head


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate; returns the results written to --out."""
    from rl.config import load_config, to_dict
    from rl.core.errors import ConfigError
    from rl.engine.deepspeed_engine import init_distributed, shutdown
    from rl.eval import prm as prm_eval

    cfg = load_config(args.config, args.overrides)
    spec, kwargs = head_spec(args, cfg)
    check_threshold_args(args)
    rows = load_labelled(args, cfg)
    batch_size = cfg.trainer.micro_batch_size if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    dist = init_distributed()
    tokenizer, policy_path = policy_tokenizer(cfg, dist)
    head = build_head(
        spec,
        kwargs,
        cfg=cfg,
        dist=dist,
        tokenizer=tokenizer,
        policy_path=policy_path,
        batch_size=batch_size,
    )
    scoring = {
        "tokenizer": tokenizer,
        "delimiter": cfg.reward.step_delimiter,
        "batch_size": batch_size,
        "apply_chat_template": cfg.data.apply_chat_template,
        "progress": cfg.logging.progress_bar,
    }
    threshold, tuning = 0.5 if args.threshold is None else args.threshold, None
    if args.tune_threshold_on is not None:
        tune_rows = prm_eval.builtin_labelled_solutions(
            cfg.data.task, args.tune_threshold_on, len(rows), cfg.seed
        )
        tune_values = prm_eval.solution_step_values(
            head, tune_rows, source=f"builtin {args.tune_threshold_on}", **scoring
        )
        threshold, tune_f1 = prm_eval.best_threshold(tune_values, [r["label"] for r in tune_rows])
        tuning = {"split": args.tune_threshold_on, "n": len(tune_rows), "f1": tune_f1}
        print(
            f"threshold {threshold:.2f}: best F1 {tune_f1:.3f} on the "
            f"{args.tune_threshold_on} split ({len(tune_rows)} solutions)",
            flush=True,
        )
    step_values = prm_eval.solution_step_values(head, rows, source=args.data, **scoring)
    result = prm_eval.score_step_values(step_values, [r["label"] for r in rows], threshold)
    head.close()
    shutdown()
    print(prm_eval.format_table(result["scores"], result["baselines"]), flush=True)
    return {
        "head": spec,
        "head_kwargs": kwargs,
        "data": args.data,
        "split": args.split if args.data in BUILTIN_DATA else None,
        "threshold": threshold,
        "threshold_tuning": tuning,
        "step_delimiter": cfg.reward.step_delimiter,
        "policy_path": policy_path,
        **result,
        "config": to_dict(cfg),
    }


def main(argv: list[str]) -> int:
    set_process_defaults(threads_per_rank=False)  # one process: all cores
    args = parse_args(argv)

    def body() -> None:
        results = run(args)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {out}", flush=True)

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
