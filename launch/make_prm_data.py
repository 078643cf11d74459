"""Make a step-label dataset for a discriminative PRM: sample solutions, label their steps.

    deepspeed --num_gpus 2 launch/make_prm_data.py --config configs/quickstart.yaml \\
        --labeler exact --out runs/prm_data [--format jsonl|datasets] [--split train] \\
        [--prompts 64] [--samples-per-prompt 4] [--n-mc 8] [--threshold 0.5] [key=value ...]
    python launch/make_prm_data.py --config configs/quickstart.yaml --labeler mc_hard --out DIR

The first --prompts prompts of a seeded order of `data.train` (its split: --split, default
`data.train_split`) are spread over the ranks; each rank samples --samples-per-prompt
solutions a prompt from the config's policy (`model`, `rollout` settings, no ZeRO: every rank
generates on a full copy), cuts them into steps at `reward.step_delimiter`, judges them with
the first reward function (`reward.functions[0]`) and labels the steps with --labeler:
`exact` (the built-in task's exact labels), `mc_hard`, `mc_soft` (--n-mc continuations from
each step prefix; rl/prm/labelers.py) or `package.module:function`, a callable
`(prompt, steps, answer) -> list[bool]`. A solution without any step is skipped (counted).

Written under --out: `parts/rank{r}.jsonl` as each batch of prompts finishes (a killed run
restarted with the same command skips the prompts done; another setting is refused), then
`data.jsonl` (or `data/`, a `datasets` directory, with --format datasets) in TRL's stepwise
format with `answer`, `outcome`, `prompt_index`, `sample`, `cost` (and `label_values` for
mc_soft) columns, and `meta.json` (settings, counts, label costs, the run's config). Read it
with `rl.prm.data.read_step_dataset(DIR)`. --out must be visible to every rank.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl.cli import config_parser, exit_process, guarded, set_process_defaults  # noqa: E402

PARTS = "parts"
"""Sub-directory of --out holding each rank's records (`rank{r}.jsonl`)."""
META = "meta.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--labeler", required=True, help="exact, mc_hard, mc_soft or mod:fn")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", default="jsonl", choices=("jsonl", "datasets"))
    parser.add_argument(
        "--split", default=None, choices=("train", "validation", "eval"), help="prompt split"
    )
    parser.add_argument("--prompts", type=int, default=64, help="prompts to sample (all ranks)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="solutions a prompt")
    parser.add_argument("--n-mc", type=int, default=8, help="mc_*: continuations per step")
    parser.add_argument("--threshold", type=float, default=0.5, help="mc_soft: label cut-off")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """ConfigError naming the flag whose value cannot work (before any model work)."""
    from rl.core.errors import ConfigError
    from rl.prm.labelers import check_labeler_name

    for flag in ("prompts", "samples_per_prompt", "n_mc"):
        if getattr(args, flag) < 1:
            name = "--" + flag.replace("_", "-")
            raise ConfigError(f"{name}: must be at least 1, got {getattr(args, flag)}")
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold: must be in [0, 1], got {args.threshold}")
    check_labeler_name(args.labeler)


def check_config(cfg: Any, labeler: str) -> None:
    """ConfigError when the config cannot serve `labeler`."""
    from rl.core.errors import ConfigError

    if not cfg.reward.functions:
        raise ConfigError("reward.functions: make_prm_data judges solutions with the first one")
    if labeler == "exact" and cfg.data.train != "builtin:arith":
        raise ConfigError(
            f"--labeler exact: labels only the built-in task (data.train: builtin:arith), "
            f"got data.train={cfg.data.train!r}"
        )


def settings(cfg: Any, args: argparse.Namespace, model_path: str) -> dict[str, Any]:
    """What the data depends on; a restart into the same --out with other values is refused."""
    mc = args.labeler in ("mc_hard", "mc_soft")
    return {
        "labeler": args.labeler,
        "model": model_path,
        "data": [cfg.data.train, cfg.data.train_split, cfg.data.train_size, cfg.data.task],
        "seed": cfg.seed,
        "samples_per_prompt": args.samples_per_prompt,
        "n_mc": args.n_mc if mc else None,
        "threshold": args.threshold if args.labeler == "mc_soft" else None,
        "sampling": [cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p],
        "verifier": [cfg.reward.functions[0].fn, cfg.reward.functions[0].kwargs],
        "step_delimiter": cfg.reward.step_delimiter,
    }


def check_settings(out: Path, want: dict[str, Any]) -> None:
    """ConfigError when `out` holds data made with other settings (naming the first one)."""
    from rl.core.errors import ConfigError
    from rl.pav.data import first_difference

    path = out / META
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("settings", {})
    key = first_difference(old, want)
    if key is not None:
        raise ConfigError(
            f"{out} holds step-label data made with {key}={old.get(key)!r}, but this run "
            f"gives {want.get(key)!r}: delete {out} or pass another --out"
        )


# ----------------------------------------------------------------------------------------------
# Rank records
# ----------------------------------------------------------------------------------------------


def read_parts(paths: Iterable[Path]) -> dict[tuple[int, int], dict[str, Any] | None]:
    """{(prompt_index, sample): example row, or None for a solution without steps} of every
    rank file; the newest record per key wins and unparseable lines (a kill mid-write) are
    skipped."""
    newest: dict[tuple[int, int], dict[str, Any] | None] = {}
    for path in sorted(paths):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                newest[(int(rec["prompt_index"]), int(rec["sample"]))] = rec["example"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return newest


def complete(records: dict[tuple[int, int], Any], samples: int) -> set[int]:
    """Prompts with a record for every sample 0..samples-1."""
    seen: dict[int, set[int]] = {}
    for prompt, sample in records:
        seen.setdefault(prompt, set()).add(sample)
    return {p for p, s in seen.items() if set(range(samples)) <= s}


def to_solutions(
    tokenizer: Any, candidates: Sequence[Any], rows: dict[int, Any], prompt_column: str
) -> list[Any]:
    """`StepSolution`s of sampled `SolutionRecord`s (those with steps); `rows`: the
    `PromptRow` of each prompt index. The problem text is the row's `prompt_column` when it
    is a string (before any chat template), else the prompt as the policy read it."""
    from rl.prm.labelers import StepSolution, record_steps

    out = []
    for c in candidates:
        if not c.step_ends:
            continue
        row = rows[c.prompt_index]
        raw = row.columns.get(prompt_column)
        out.append(
            StepSolution(
                prompt=raw if isinstance(raw, str) else row.text,
                steps=record_steps(tokenizer, c.response_ids, c.step_ends),
                answer=row.answer,
                outcome=c.labels[-1],
                extra={"outcome": c.labels[-1], "prompt_index": c.prompt_index, "sample": c.sample},
                handle=(c, row),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def label_batch(
    cfg: Any,
    args: argparse.Namespace,
    rollout: Any,
    policy: Any,
    tokenizer: Any,
    labeler: Any,
    batch: list[Any],
) -> list[dict[str, Any]]:
    """Sample --samples-per-prompt solutions for each `PromptRow` of `batch` and label them:
    one rank-file record per solution (`example` None for a solution without steps)."""
    from rl.pav.data import sample_candidates
    from rl.pav.train import first_verifier
    from rl.setup import training_sampling

    candidates = sample_candidates(
        rollout,
        policy,
        tokenizer,
        batch,
        first_verifier(cfg),
        training_sampling(cfg),
        args.samples_per_prompt,
        cfg.reward.step_delimiter,
    )
    by_index = {r.index: r for r in batch}
    examples = labeler(to_solutions(tokenizer, candidates, by_index, cfg.data.prompt_column))
    rows = {(e.extra["prompt_index"], e.extra["sample"]): e.to_row() for e in examples}
    return [
        {
            "prompt_index": c.prompt_index,
            "sample": c.sample,
            "example": rows.get((c.prompt_index, c.sample)),
        }
        for c in candidates
    ]


def label_prompts(
    cfg: Any,
    args: argparse.Namespace,
    dist: Any,
    rollout: Any,
    policy: Any,
    tokenizer: Any,
    mine: list[Any],
) -> None:
    """Sample, label and append this rank's prompts `mine` to its rank file, a batch of
    prompts at a time (`rollout.generation_batch_size` solutions)."""
    from tqdm import tqdm

    from rl.data.jsonl import append_jsonl
    from rl.pav.train import first_verifier
    from rl.prm.labelers import LabelerOptions, make_labeler, rollout_continuations
    from rl.setup import training_sampling
    from rl.tasks.arith import ArithConfig

    modulus = ArithConfig(**dict(cfg.data.task)).modulus if args.labeler == "exact" else None
    continuations = rollout_continuations(
        rollout, policy, tokenizer, first_verifier(cfg), training_sampling(cfg)
    )
    labeler = make_labeler(
        args.labeler, LabelerOptions(args.n_mc, args.threshold, modulus, continuations)
    )
    part = Path(args.out) / PARTS / f"rank{dist.rank}.jsonl"
    per_batch = max(1, cfg.rollout.generation_batch_size // args.samples_per_prompt)
    bar = None
    if dist.is_main and cfg.logging.progress_bar and mine:
        bar = tqdm(total=len(mine), desc="prm data (rank 0)", unit="prompt")
    for start in range(0, len(mine), per_batch):
        batch = mine[start : start + per_batch]
        append_jsonl(part, label_batch(cfg, args, rollout, policy, tokenizer, labeler, batch))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()


def select_prompts(cfg: Any, tokenizer: Any, n: int) -> list[Any]:
    """The first `n` prepared prompts of `data.train` (split `data.train_split`) in a seeded
    order, as the PAV pipeline draws them (a larger `n` extends a smaller run's prompts)."""
    from rl.core.errors import DataError
    from rl.data.prompts import PromptSampler
    from rl.setup import prompt_rows

    kept, _ = prompt_rows(cfg, tokenizer, "train")
    if not kept:
        raise DataError(f"{cfg.data.train}: no usable prompts for step-label data")
    order = PromptSampler(len(kept), cfg.seed).take(min(n, len(kept)))
    return [kept[i] for i in order]


def finish(
    cfg: Any, args: argparse.Namespace, model_path: str, prompts: list[Any], seconds: float
) -> dict[str, Any]:
    """Rank 0: gather the rank files into the dataset and `meta.json`; returns the meta."""
    from rl.config import to_dict
    from rl.prm.data import DATASETS_NAME, JSONL_NAME, parse_row, total_cost, write_step_dataset

    out = Path(args.out)
    records = read_parts((out / PARTS).glob("rank*.jsonl"))
    wanted = {r.index for r in prompts}
    keys = sorted(k for k in records if k[0] in wanted and k[1] < args.samples_per_prompt)
    rows = [records[k] for k in keys]
    examples = [
        parse_row(r, f"{out / PARTS} prompt {k[0]} sample {k[1]}")
        for k, r in zip(keys, rows, strict=True)
        if r is not None
    ]
    name, other = (
        (JSONL_NAME, DATASETS_NAME) if args.format == "jsonl" else (DATASETS_NAME, JSONL_NAME)
    )
    path = write_step_dataset(examples, out / name, args.format)
    if (out / other).is_dir():  # a restart in the other format: one dataset in --out
        shutil.rmtree(out / other)
    elif (out / other).is_file():
        (out / other).unlink()
    labels = [b for ex in examples for b in ex.labels]
    meta = {
        "settings": settings(cfg, args, model_path),
        "labeler": args.labeler,
        "format": args.format,
        "file": name,
        "counts": {
            "prompts": len(prompts),
            "solutions": len(examples),
            "skipped_no_steps": len(keys) - len(examples),
            "steps": len(labels),
            "good_steps": sum(labels),
            "all_good_solutions": sum(all(ex.labels) for ex in examples),
        },
        "cost": total_cost(examples),
        "time_s": seconds,
        "config": to_dict(cfg),
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    print(summary_line(meta, path), flush=True)
    return meta


def summary_line(meta: dict[str, Any], path: Path) -> str:
    """One line: what was labelled, how, and what it cost."""
    n, cost = meta["counts"], meta["cost"]
    good = n["good_steps"] / max(1, n["steps"])
    return (
        f"make_prm_data: {n['prompts']} prompts, {n['solutions']} solutions "
        f"({n['skipped_no_steps']} without steps skipped), {n['steps']} step labels by "
        f"{meta['labeler']} ({good:.1%} good); cost {cost['teacher_labels']} teacher labels, "
        f"{cost['mc_rollouts']} MC rollouts ({meta['time_s']:.0f} s) -> {path}"
    )


def run(cfg: Any, dist: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Sample and label every prompt not done yet, then (rank 0) write the dataset. Every
    rank calls it; returns the meta on rank 0 ({} elsewhere)."""
    from rl.engine import deepspeed_engine as eng
    from rl.engine.models import load_policy
    from rl.pav.train import open_rollout
    from rl.setup import check_shared_dir, seed_everything

    out = Path(args.out)
    check_shared_dir(out, dist, "--out")  # every rank writes files rank 0 reads
    seed_everything(cfg.seed)
    policy, tokenizer, model_path = load_policy(cfg, dist)
    prompts = select_prompts(cfg, tokenizer, args.prompts)
    want = settings(cfg, args, model_path)
    check_settings(out, want)
    done = complete(read_parts((out / PARTS).glob("rank*.jsonl")), args.samples_per_prompt)
    eng.barrier()  # every rank has read the files (and checked) before any rank writes
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / META).is_file():
            (out / META).write_text(json.dumps({"settings": want}, indent=2) + "\n")
        if done & {r.index for r in prompts}:
            n_done = len(done & {r.index for r in prompts})
            print(f"make_prm_data: resuming: {n_done}/{len(prompts)} prompts already done")
    todo = [r for r in prompts if r.index not in done]
    start = time.perf_counter()
    rollout = open_rollout(cfg, dist, policy, tokenizer, model_path)
    label_prompts(cfg, args, dist, rollout, policy, tokenizer, todo[dist.rank :: dist.world_size])
    eng.barrier()
    meta = (
        finish(cfg, args, model_path, prompts, time.perf_counter() - start) if dist.is_main else {}
    )
    eng.barrier()
    rollout.close()
    return meta


def main(argv: list[str]) -> int:
    set_process_defaults()
    args = parse_args(argv)

    def body() -> None:
        from rl.config import load_config
        from rl.engine.deepspeed_engine import init_distributed, shutdown

        check_args(args)
        split = [f"data.train_split={args.split}"] if args.split else []
        cfg = load_config(args.config, [*args.overrides, *split])
        check_config(cfg, args.labeler)
        if ":" in args.labeler:  # import the user's callable before any model work
            from rl.prm.labelers import make_labeler

            make_labeler(args.labeler)
        dist = init_distributed()
        run(cfg, dist, args)
        shutdown()

    return guarded(body)


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
