"""End-to-end: launch/train_prm.py under the real deepspeed launcher (2 ranks, ZeRO-3) on a small
step-label dataset with exact labels from the arithmetic task, buying half of the training
labels by ensemble uncertainty; the saved PRM loads with `load_prm` and ranks held-out steps
better than chance, exactly as the run measured it (weights gathered from ZeRO-3 shards)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.launcher import FAST_OVERRIDES, REPO, check_ok, launch

TRAIN_PRM = REPO / "launch" / "train_prm.py"

pytestmark = pytest.mark.e2e


def write_arith_steps(path: Path, prompts: int, seed: int) -> list[dict[str, object]]:
    """Two solutions per problem of the arithmetic task: the right one and one with the
    demonstrations' slip (the first "*" computed as "+") when the problem has a "*", else a
    random wrong value at a random step; labels are exact (a step is good while the solution
    is still right). TRL's stepwise rows, one per line."""
    from rl.tasks import arith

    rng = random.Random(seed)
    rows = []
    for problem in arith.sample_problems("train", prompts, arith.ArithConfig(), seed):
        wrong = arith.slip(problem)
        if wrong is None:
            step = rng.randrange(len(problem.ops))
            right = problem.values()[step + 1]
            wrong = (step, (right + rng.randrange(1, problem.modulus)) % problem.modulus)
        for lines in (arith.step_lines(problem), arith.step_lines(problem, *wrong)):
            first = arith.first_error_step(problem, "\n".join(lines))
            labels = [first == -1 or h < first for h in range(len(lines))]
            rows.append({"prompt": problem.prompt, "completions": lines, "labels": labels})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_train_prm_zero3_active(tmp_path: Path, model_cache: Path) -> None:
    from rl.prm.fitting import prm_scores, split_examples
    from rl.prm.model import load_prm, step_probabilities

    data = tmp_path / "steps.jsonl"
    rows = write_arith_steps(data, prompts=128, seed=0)
    out = tmp_path / "prm"
    proc = launch(
        [
            *FAST_OVERRIDES,
            f"output_dir={tmp_path / 'run'}",
            f"model.cache_dir={model_cache}",
            "deepspeed.zero_stage=3",
            f"prm.data={data}",
            f"prm.output_dir={out}",
            "prm.epochs=4",
            "prm.lr=1e-3",
            "prm.micro_batch_size=4",
            "prm.val_fraction=0.25",
            "prm.budget_frac=0.5",
            "prm.selection=uncertainty",
            "prm.select_rounds=2",
            "prm.selector_epochs=1",
        ],
        script=TRAIN_PRM,
    )
    check_ok(proc)
    metrics = json.loads((out / "train_prm_metrics.json").read_text())
    sel = metrics["selection"]
    assert metrics["val_solutions"] == 64  # 32 of 128 prompts, 2 solutions each
    assert sel["pool_solutions"] == 192 and sel["labelled_solutions"] == 96
    assert sel["skipped_solutions"] == 96 and sel["rounds"] == 2
    assert sel["teacher_labels"] + sel["skipped_steps"] == 192 * 4
    assert len(sel["selector_loss"]) == 1
    assert f"prm: 192 training solutions, 96 labelled ({sel['teacher_labels']} step labels" in (
        proc.stdout
    )
    kept = metrics["epochs"][metrics["kept_epoch"] - 1]
    assert kept["val_loss"] == min(row["val_loss"] for row in metrics["epochs"])
    # the saved PRM, read on this process, scores the held-out steps as the run did
    model, tok = load_prm(out)

    class Row:
        def __init__(self, r: dict[str, object]) -> None:
            self.prompt, self.completions, self.labels = r["prompt"], r["completions"], r["labels"]

    examples = [Row(r) for r in rows]
    _, val_idx = split_examples(examples, 0.25, seed=0)
    val = [examples[i] for i in val_idx]
    probs = step_probabilities(model, tok, [e.prompt for e in val], [e.completions for e in val])
    scores = prm_scores(probs, [e.labels for e in val])
    assert scores["auc"] == pytest.approx(kept["val_auc"], abs=1e-4)
    # better than chance (about 0.63-0.66 in single-process runs: the tiny model learns where
    # errors can be, after the first "*", more than it learns to check the arithmetic)
    assert scores["auc"] > 0.55, metrics["epochs"]
