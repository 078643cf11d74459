"""Test-time search with a process verifier: accuracy against compute for best-of-N (by the
value after the last step, and by the lowest step value), majority vote and PAV's step-level
beam search (rl/eval/search.py).

    python launch/search.py --config configs/quickstart.yaml --head pav \\
        --head-kwargs '{path: runs/pav/verifier}' [--policy PATH] [--budgets 4,8,16] \\
        [--strategies best_of_n,best_of_n_min,majority,beam] [--beam-width W] [--alpha 0.5] \\
        [--prover-k 4] [--n 128] [--split eval] [--scorer-cache on|off] [--out DIR] \\
        [--quick] [key=value ...]

--head: the scorer, a registered head or `package.module:ClassName` with --head-kwargs (a
PAV verifier gives Q^pi), or `exact`: the built-in task's exact step labels (the upper
bound of any verifier). A discriminative PRM is `--head prm --head-kwargs '{path: DIR}'`
(`rewards/prm_head.py`; its own tokenizer and step tag, docs/search.md). --policy: the
checkpoint to search with (default `model.path`).
--scorer-cache: `on` reads every verifier token once, each candidate's new step on top of its
beam's cached keys and values (`rl/eval/cached_scoring.py`; heads `prm` and `pav`), `off`
re-reads every candidate whole through the head (the reference); default: on where the head
supports it. Both give the same values (fp32, 1e-5); verifier tokens are the tokens the
verifier's model reads, in its own tokenizer.
A budget B is the samples per problem of best-of-N and majority vote, and the candidates
per step of beam search (width W times E expansions, W * E = B; W defaults to the largest
power of two with W^2 <= B), so all strategies sample about B solutions' worth of tokens;
the measured tokens are reported. Accuracy is the config's first reward function on the
held-out `--split` prompts (`data.eval`, --n of them); sampling at `rollout.temperature`.

Writes `--out`/search.csv (one row per strategy and budget: accuracy, policy tokens and
verifier tokens per problem), `--out`/search.png (accuracy vs generated tokens) and
prints the table. --quick: 8 problems, budgets 2,4. One process (plain `python`);
torch.distributed is initialised as a world of one for heads that build DeepSpeed engines.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl.cli import config_parser, guarded, set_process_defaults  # noqa: E402  (no torch)

DEFAULT_STRATEGIES = "best_of_n,best_of_n_min,majority,beam"

CSV_COLUMNS: tuple[str, ...] = (
    "strategy",
    "budget",
    "beam_width",
    "expansions",
    "accuracy",
    "generated_tokens_per_problem",
    "verifier_tokens_per_problem",
    "problems",
    "scorer_cache",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--head", required=True, help="registered head, module:Class or 'exact'")
    parser.add_argument("--head-kwargs", default=None, help="YAML mapping of head kwargs")
    parser.add_argument("--policy", default=None, help="checkpoint to search with")
    parser.add_argument("--budgets", default="4,8,16", help="comma-separated budgets")
    # rl.eval.search.STRATEGIES (not imported here: it loads torch)
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    parser.add_argument("--beam-width", type=int, default=None, help="W (default: see above)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of A^mu in the score")
    parser.add_argument("--prover-k", type=int, default=4, help="K of the Best-of-K prover")
    parser.add_argument("--max-steps", type=int, default=32, help="beam search iterations")
    parser.add_argument("--n", type=int, default=128, help="problems")
    parser.add_argument("--split", default="eval", help="split of data.eval")
    parser.add_argument(
        "--scorer-cache",
        default=None,
        help="on: cached prefixes (prm, pav); off: re-read every candidate (default: on where "
        "supported)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/search"))
    parser.add_argument("--quick", action="store_true", help="8 problems, budgets 2,4")
    return parser.parse_args(argv)


def checked_options(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """(budgets, strategies); ConfigError naming the bad option."""
    from rl.core.errors import ConfigError
    from rl.eval.search import STRATEGIES, beam_shape

    try:
        budgets = [int(b) for b in ("2,4" if args.quick else args.budgets).split(",") if b]
    except ValueError as e:
        raise ConfigError(f"--budgets: expected integers like 4,8,16, got {args.budgets!r}") from e
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        raise ConfigError(f"--strategies: unknown {unknown}; valid: {list(STRATEGIES)}")
    if "beam" in strategies:
        for budget in budgets:
            beam_shape(budget, args.beam_width)
    elif any(b < 1 for b in budgets):
        raise ConfigError(f"--budgets: every budget must be >= 1, got {budgets}")
    if args.prover_k < 1:
        raise ConfigError(f"--prover-k must be >= 1, got {args.prover_k}")
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.scorer_cache not in (None, "on", "off"):
        raise ConfigError(f"--scorer-cache: expected on or off, got {args.scorer_cache!r}")
    return budgets, strategies


def make_scorer(args: argparse.Namespace, cfg: Any, dist: Any, tokenizer: Any, path: str) -> Any:
    """The scorer of --head: ExactScorer, a CachedScorer over the built head where it has a
    cached reader and --scorer-cache is not off, else a HeadScorer (re-reads every row)."""
    from launch.eval_prm import build_head, head_spec
    from rl.core.errors import ConfigError
    from rl.eval.cached_scoring import CachedScorer, reader_for
    from rl.eval.search import ExactScorer, HeadScorer
    from rl.tasks.arith import ArithConfig

    delimiter = cfg.reward.step_delimiter
    if args.head == "exact":  # no model: nothing to cache
        if not cfg.data.eval.startswith("builtin:arith"):
            raise ConfigError(
                f"--head exact: exact step labels exist for the built-in task only "
                f"(data.eval builtin:arith), got data.eval={cfg.data.eval!r}"
            )
        return ExactScorer(tokenizer, ArithConfig(**dict(cfg.data.task)).modulus, delimiter)
    spec, kwargs = head_spec(args, cfg)
    batch = cfg.trainer.micro_batch_size
    head = build_head(
        spec, kwargs, cfg=cfg, dist=dist, tokenizer=tokenizer, policy_path=path, batch_size=batch
    )
    reader = reader_for(head, tokenizer, tokenizer.pad_token_id, delimiter)
    reference = HeadScorer(head, tokenizer, tokenizer.pad_token_id, delimiter, batch, reader)
    if args.scorer_cache == "off":
        return reference
    if reader is None:
        if args.scorer_cache == "on":
            raise ConfigError(
                f"--scorer-cache on: head {spec!r} has no cached reader (supported: prm, pav "
                "with terminal: verifier); use --scorer-cache off"
            )
        return reference
    return CachedScorer(reader, tokenizer.pad_token_id, batch)


@dataclass
class Setup:
    """What every budget's search uses."""

    problems: list[Any]
    prompt_texts: list[str]
    sampler: Any
    scorer: Any
    verify: Any


def setup(args: argparse.Namespace, n: int) -> Setup:
    """Load the config, the policy, the scorer and `n` held-out problems."""
    import torch
    from transformers import AutoModelForCausalLM

    from launch.eval_prm import policy_tokenizer
    from rewards.base import RewardSpec
    from rewards.build import make_verifier
    from rl.config import load_config
    from rl.engine.deepspeed_engine import init_distributed
    from rl.engine.models import run_dtype
    from rl.eval import search
    from rl.setup import prompt_rows, stop_token_ids

    overrides = [*args.overrides, f"data.eval_split={args.split}", f"data.eval_size={n}"]
    overrides += [f"model.path={args.policy}"] if args.policy else []
    cfg = load_config(args.config, overrides)
    dist = init_distributed()
    tokenizer, path = policy_tokenizer(cfg, dist)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=run_dtype(cfg)).to(device).eval()
    rows, _ = prompt_rows(cfg, tokenizer, "eval")
    problems = [
        search.Problem(str(r.columns["prompt"]), list(r.prompt_ids), str(r.columns["answer"]))
        for r in rows
    ]
    stops = [tokenizer.eos_token_id, *stop_token_ids(cfg, tokenizer, model)]
    rollout = cfg.rollout
    sampler = search.Sampler(
        model,
        tokenizer,
        list(dict.fromkeys(stops)),
        tokenizer.pad_token_id,
        rollout.temperature,
        rollout.max_new_tokens,
        cfg.reward.step_delimiter,
    )
    first = cfg.reward.functions[0]
    verify = make_verifier(RewardSpec(first.fn, 1.0, dict(first.kwargs)))
    scorer = make_scorer(args, cfg, dist, tokenizer, path)
    torch.manual_seed(cfg.seed)
    return Setup(problems, [r.text for r in rows], sampler, scorer, verify)


def search_budget(
    args: argparse.Namespace, s: Setup, budget: int, strategies: list[str]
) -> list[dict[str, Any]]:
    """One CSV row per strategy at `budget`."""
    from rl.eval import search

    outcomes: dict[str, tuple[Any, int, int]] = {}
    if set(search.WHOLE_SOLUTION_STRATEGIES) & set(strategies):
        both = search.best_of_n_and_majority(s.problems, s.sampler, s.scorer, budget)
        outcomes.update({name: (out, 0, budget) for name, out in both.items()})
    if "beam" in strategies:
        width, expand = search.beam_shape(budget, args.beam_width)
        out = search.beam_search(
            s.problems,
            s.sampler,
            s.scorer,
            width,
            expand,
            args.alpha,
            args.prover_k,
            args.max_steps,
        )
        outcomes["beam"] = (out, width, expand)
    columns = {"answer": [p.answer for p in s.problems], "prompt": [p.prompt for p in s.problems]}
    rows = []
    for name in strategies:
        out, width, expand = outcomes[name]
        scores = s.verify(s.prompt_texts, out.completions, columns)  # [N] in [0, 1]
        n = len(s.problems)
        rows.append(
            {
                "strategy": name,
                "budget": budget,
                "beam_width": width,
                "expansions": expand,
                "accuracy": float(scores.float().mean()),
                "generated_tokens_per_problem": out.compute.generated_tokens / n,
                "verifier_tokens_per_problem": out.compute.verifier_tokens / n,
                "problems": n,
                "scorer_cache": scorer_cache_state(s.scorer),
            }
        )
        print(format_row(rows[-1]), flush=True)
    return rows


def scorer_cache_state(scorer: Any) -> str:
    """`on` for a cached scorer, `off` for one that re-reads, `-` for one without a model."""
    from rl.eval.cached_scoring import CachedScorer
    from rl.eval.search import HeadScorer

    if isinstance(scorer, CachedScorer):
        return "on"
    return "off" if isinstance(scorer, HeadScorer) else "-"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from rl.engine.deepspeed_engine import shutdown

    budgets, strategies = checked_options(args)
    s = setup(args, 8 if args.quick else args.n)
    results = [row for budget in budgets for row in search_budget(args, s, budget, strategies)]
    shutdown()
    return results


def format_row(row: dict[str, Any]) -> str:
    shape = f" (W={row['beam_width']}, E={row['expansions']})" if row["strategy"] == "beam" else ""
    return (
        f"{row['strategy']}{shape} budget {row['budget']}: accuracy {100 * row['accuracy']:.1f}% "
        f"| {row['generated_tokens_per_problem']:.0f} policy tokens/problem "
        f"| {row['verifier_tokens_per_problem']:.0f} verifier tokens/problem"
        f" (cache {row['scorer_cache']})"
    )


def write_outputs(results: list[dict[str, Any]], out: Path) -> None:
    """search.csv and (with matplotlib) search.png."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "search.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no plot written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        mine = [r for r in results if r["strategy"] == strategy]
        ax.plot(
            [r["generated_tokens_per_problem"] for r in mine],
            [r["accuracy"] for r in mine],
            marker="o",
            label=strategy,
        )
    ax.set_xscale("log")
    ax.set_xlabel("policy tokens generated per problem")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "search.png", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    set_process_defaults(threads_per_rank=False)  # one process: all cores
    args = parse_args(argv)

    def body() -> None:
        results = run(args)
        write_outputs(results, args.out)
        print(f"wrote {args.out / 'search.csv'}", flush=True)

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
