"""How well a step scorer ranks what test-time search must choose between (a diagnostic for
benchmarks/results/search/summary.md, built-in arithmetic task only).

    python benchmarks/search_ranking.py --config configs/quickstart.yaml --head pav \\
        --head-kwargs '{path: PAV_VERIFIER}' [--policy PATH] [--n 128] [--k 8] [key=value ...]

Samples `--k` whole solutions per held-out problem (as best-of-N does, same seed) and
prints, as JSON, the scorer's ranking quality as AUCs (0.5 = chance):

- `auc_final_within_problem`: over pairs of samples of one problem, one with the right final
  answer and one without, how often the value after the last step ranks the right one
  higher (what best-of-N needs);
- `auc_final_pooled`: the same over all samples of all problems;
- `auc_step_siblings`: over pairs of samples of one problem that share a correct prefix of
  h - 1 steps (the same text: the task's steps are deterministic), one whose step h is right
  and one whose step h is the first wrong one, how often the value after step h ranks the
  right one higher (what step-level beam search needs);

and the share of samples with the right answer and with every step right.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pair_auc(pairs: list[tuple[float, float]]) -> float:
    """P(first > second) + P(tie) / 2 over (score of the positive, score of the negative)."""
    if not pairs:
        return float("nan")
    return sum((a > b) + 0.5 * (a == b) for a, b in pairs) / len(pairs)


def main(argv: list[str]) -> None:
    from launch.search import parse_args, setup
    from rl.cli import set_process_defaults
    from rl.config import load_config
    from rl.eval import search
    from rl.tasks.arith import ArithConfig

    set_process_defaults(threads_per_rank=False)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--k", type=int, default=8, help="samples per problem")
    extra, rest = pre.parse_known_args(argv)
    args = parse_args(rest)
    k = extra.k
    s = setup(args, args.n)
    modulus = ArithConfig(**dict(load_config(args.config, args.overrides).data.task)).modulus
    samples = search.whole_solutions(s.problems, s.sampler, k)
    problems = [p for p, group in zip(s.problems, samples, strict=True) for _ in group]
    flat = [ids for group in samples for ids in group]
    values = s.scorer.values(problems, flat, keep=False)
    exact = search.ExactScorer(s.sampler.tokenizer, modulus).values(problems, flat)
    texts = [s.sampler.tokenizer.decode(ids, skip_special_tokens=True) for ids in flat]
    columns = {"answer": [p.answer for p in problems], "prompt": [p.prompt for p in problems]}
    right = [bool(x) for x in s.verify([p.prompt for p in problems], texts, columns).tolist()]
    last = [v[-1] if v else 0.0 for v in values]

    scored = list(zip(last, right, strict=True))
    pooled = [(a, b) for a, ra in scored for b, rb in scored if ra and not rb]
    within: list[tuple[float, float]] = []
    siblings: list[tuple[float, float]] = []
    for i in range(len(s.problems)):
        rows = range(i * k, (i + 1) * k)
        within += [(last[a], last[b]) for a in rows for b in rows if right[a] and not right[b]]
        for h in range(max(len(exact[r]) for r in rows)):
            ok = [
                r
                for r in rows
                if len(exact[r]) > h and len(values[r]) > h and (h == 0 or exact[r][h - 1] == 1.0)
            ]
            good = [values[r][h] for r in ok if exact[r][h] == 1.0]
            bad = [values[r][h] for r in ok if exact[r][h] == 0.0]
            siblings += [(a, b) for a in good for b in bad]
    n = len(flat)
    print(
        json.dumps(
            {
                "problems": len(s.problems),
                "samples_per_problem": k,
                "answer_right": sum(right) / n,
                "every_step_right": sum(bool(v) and v[-1] == 1.0 for v in exact) / n,
                "auc_final_within_problem": pair_auc(within),
                "pairs_final_within_problem": len(within),
                "auc_final_pooled": pair_auc(pooled),
                "auc_step_siblings": pair_auc(siblings),
                "pairs_step_siblings": len(siblings),
                "value_after_last_step_mean_right": sum(a for a, r in scored if r)
                / max(1, sum(right)),
                "value_after_last_step_mean_wrong": sum(a for a, r in scored if not r)
                / max(1, n - sum(right)),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
