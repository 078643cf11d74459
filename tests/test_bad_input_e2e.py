"""Bad input through the real launcher: a one-line `error:` naming the cause, no trace first."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.launcher import FAST_OVERRIDES, launch, read_metrics

pytestmark = pytest.mark.e2e


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    """Neither a failing nor a finishing run prints a Python traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]


def first_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert lines, stderr[-3000:]
    return lines[0]


def test_unknown_config_key_names_key_and_closest(tmp_path: Path):
    proc = launch([f"output_dir={tmp_path}", "trainer.max_step=3"], launcher="python")
    assert proc.returncode == 2
    assert first_line(proc.stderr) == (
        "error: unknown config key 'trainer.max_step' (did you mean 'trainer.max_steps'?)"
    )
    assert_no_traceback(proc)


def test_nan_reward_names_the_function(tmp_path: Path, model_cache: Path):
    proc = launch(
        [
            *FAST_OVERRIDES,
            f"output_dir={tmp_path}",
            f"model.cache_dir={model_cache}",
            "reward.functions=[{fn: 'tests.reward_fns:not_a_number'}]",
        ],
        launcher="python",
    )
    assert proc.returncode == 2
    assert first_line(proc.stderr) == (
        "error: reward function 'tests.reward_fns:not_a_number' returned nan at index 0"
    )
    assert_no_traceback(proc)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_missing_answer_column_names_row_and_column(tmp_path: Path, model_cache: Path):
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [{"question": "1 +2", "answer": "3"}, {"question": "2 +2", "solution": "4"}],
    )
    proc = launch(
        [
            *FAST_OVERRIDES,
            f"output_dir={tmp_path / 'run'}",
            f"model.cache_dir={model_cache}",
            f"data.train={data}",
            "data.prompt_column=question",
        ],
        launcher="python",
    )
    assert proc.returncode == 2
    line = first_line(proc.stderr)
    assert line.startswith(f"error: {data} row 1: missing column 'answer'"), line
    assert_no_traceback(proc)


def test_long_prompts_are_skipped_and_counted(tmp_path: Path, model_cache: Path):
    short = [{"prompt": f"{i} +1", "answer": str((i + 1) % 10)} for i in range(8)]
    long = [{"prompt": "1" + " +1" * 40, "answer": "1"} for _ in range(3)]
    data = write_jsonl(tmp_path / "train.jsonl", short + long)
    out = tmp_path / "run"
    proc = launch(
        [
            *FAST_OVERRIDES,
            f"output_dir={out}",
            f"model.cache_dir={model_cache}",
            f"data.train={data}",
            "data.max_prompt_tokens=40",
            "trainer.max_steps=1",
        ],
        launcher="python",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert rows[-1]["data/skipped_long_prompts"] == 3
    assert_no_traceback(proc)


@pytest.mark.parametrize(
    "head, message",
    [
        ("raising_head", "error: reward head 'raising_head' raised RuntimeError: model server"),
        (
            "nan_head",
            "error: reward head 'nan_head' returned non-finite token rewards in 2 row(s): "
            "batch rows 1, 3",
        ),
        ("wrong_shape_head", "error: reward head 'wrong_shape_head' returned token_rewards of the"),
    ],
)
def test_bad_reward_head_is_named(head: str, message: str, tmp_path: Path, model_cache: Path):
    spec = "tests.bad_heads:" + "".join(p.title() for p in head.split("_")).replace("Nan", "NaN")
    proc = launch(
        [
            *FAST_OVERRIDES,
            f"output_dir={tmp_path}",
            f"model.cache_dir={model_cache}",
            f"reward.heads=[{{head: '{spec}'}}]",
            "algo.credit=sum",
        ],
        launcher="python",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert first_line(proc.stderr).startswith(message), first_line(proc.stderr)
    assert_no_traceback(proc)


def test_a_used_output_dir_is_refused_then_overwritten(tmp_path: Path, model_cache: Path):
    # an earlier run's rows and checkpoint: a new run must neither append to nor resume them
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(41)))
    (tmp_path / "checkpoints" / "step_00000040").mkdir(parents=True)
    args = [*FAST_OVERRIDES, f"output_dir={tmp_path}", f"model.cache_dir={model_cache}"]
    proc = launch(args, launcher="python")
    assert proc.returncode == 2
    assert first_line(proc.stderr) == (
        f"error: output_dir {tmp_path} already holds a run (metrics.jsonl, checkpoints); "
        "continue it with trainer.resume=auto, or start over with trainer.overwrite=true "
        "(deletes it)"
    )
    assert_no_traceback(proc)
    proc = launch([*args, "trainer.overwrite=true"], launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_no_traceback(proc)
    assert [row["step"] for row in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert not (tmp_path / "checkpoints" / "step_00000040").exists()


def test_grad_share_with_a_zero3_json_names_the_key(tmp_path: Path):
    # the stage comes from the DeepSpeed JSON, not deepspeed.zero_stage: caught at startup
    proc = launch(
        [
            f"output_dir={tmp_path}",
            "deepspeed.config=configs/deepspeed/zero3.json",
            "logging.credit_diagnostics=true",
            "logging.credit_grad_share=true",
        ],
        launcher="python",
    )
    assert proc.returncode == 2
    assert first_line(proc.stderr) == (
        "error: logging.credit_grad_share: needs deepspeed.zero_stage 0-2, got 3"
    )
    assert_no_traceback(proc)
