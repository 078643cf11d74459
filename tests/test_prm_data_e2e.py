"""End-to-end: launch/make_prm_data.py under the real deepspeed launcher (2 ranks, `exact`
labels), a one-rank restart that finds every prompt done, a refused restart with another
setting, a bad labeler name, then `mc_hard` labels written as a `datasets` directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.prm.data import read_step_dataset
from rl.tasks.arith import first_error_step
from tests.launcher import FAST_OVERRIDES, REPO, check_ok, launch

MAKE = REPO / "launch" / "make_prm_data.py"

pytestmark = pytest.mark.e2e


def part_lines(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / "parts").glob("rank*.jsonl"))


def test_make_prm_data_exact_on_two_ranks_then_mc_hard(tmp_path: Path, model_cache: Path) -> None:
    common = [*FAST_OVERRIDES, f"output_dir={tmp_path / 'run'}", f"model.cache_dir={model_cache}"]
    out = tmp_path / "exact"
    flags = ["--labeler", "exact", "--out", str(out), "--prompts", "6", "--samples-per-prompt", "2"]
    proc = launch([*flags, *common], script=MAKE)
    check_ok(proc)
    assert "make_prm_data: 6 prompts, " in proc.stdout, proc.stdout[-2000:]
    parts = sorted(p.name for p in (out / "parts").glob("*.jsonl"))
    assert parts == ["rank0.jsonl", "rank1.jsonl"]  # both ranks sampled
    assert part_lines(out) == 12  # one record per solution, with steps or not

    examples = read_step_dataset(out)
    meta = json.loads((out / "meta.json").read_text())
    counts = meta["counts"]
    assert counts["solutions"] == len(examples)
    assert counts["solutions"] + counts["skipped_no_steps"] == 12
    keys = {(ex.extra["prompt_index"], ex.extra["sample"]) for ex in examples}
    assert len(keys) == len(examples) and len({k[0] for k in keys}) <= 6
    for ex in examples:
        # steps before the first wrong line are right; a missing line marks the last step
        first = first_error_step(ex.prompt, "\n".join(ex.completions), 7)
        first = len(ex.completions) if first < 0 else min(first, len(ex.completions) - 1)
        assert ex.labels == [h < first for h in range(len(ex.completions))]
        if all(ex.labels):  # a solution right at every step verifies
            assert ex.extra["outcome"] == 1.0
        assert ex.cost == {"teacher_labels": len(ex.completions), "mc_rollouts": 0}
    n_steps = sum(len(ex.labels) for ex in examples)
    assert meta["cost"] == {"teacher_labels": n_steps, "mc_rollouts": 0}
    assert counts["steps"] == n_steps
    assert counts["good_steps"] == sum(sum(ex.labels) for ex in examples)
    assert meta["labeler"] == "exact" and meta["config"]["model"]["path"] == "builtin:arith-tiny"

    # a restart (one rank) finds every prompt done and regenerates nothing
    proc = launch([*flags, *common], launcher="python", script=MAKE)
    check_ok(proc)
    assert "resuming: 6/6 prompts already done" in proc.stdout
    assert part_lines(out) == 12
    assert read_step_dataset(out) == examples

    # another setting into the same --out is refused, naming it
    flags_k3 = [*flags[:-1], "3"]
    proc = launch([*flags_k3, *common], launcher="python", script=MAKE)
    assert proc.returncode == 2
    assert "made with samples_per_prompt=2, but this run gives 3" in proc.stderr

    # a bad labeler name fails in one line before any model work
    proc = launch([*flags[:1], "mc_hrad", *flags[2:], *common], launcher="python", script=MAKE)
    assert proc.returncode == 2
    assert "error: unknown step labeler 'mc_hrad' (did you mean 'mc_hard'?)" in proc.stderr

    # Monte-Carlo hard estimation, one rank, written as a datasets directory
    mc = tmp_path / "mc"
    mc_flags = ["--labeler", "mc_hard", "--out", str(mc), "--prompts", "3"]
    mc_flags += ["--samples-per-prompt", "2", "--n-mc", "2", "--format", "datasets"]
    proc = launch([*mc_flags, *common], launcher="python", script=MAKE)
    check_ok(proc)
    assert (mc / "data" / "state.json").is_file() and not (mc / "data.jsonl").exists()
    mc_examples = read_step_dataset(mc)
    assert mc_examples
    for ex in mc_examples:
        assert ex.cost == {"teacher_labels": 0, "mc_rollouts": 2 * (len(ex.completions) - 1)}
        assert ex.labels[-1] == (ex.extra["outcome"] >= 0.5)  # the last label is the outcome
    mc_meta = json.loads((mc / "meta.json").read_text())
    total = sum(ex.cost["mc_rollouts"] for ex in mc_examples)
    assert mc_meta["cost"] == {"teacher_labels": 0, "mc_rollouts": total}
    assert f"{total} MC rollouts" in proc.stdout
