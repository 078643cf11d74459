"""One dtype per run: in bf16 (on this CPU) the policy, its reference and the implicit PRM's
model and reference all load in bf16, so at the first step the KL to the reference and the
implicit rewards are exactly zero, and the saved policy says it is bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launcher import FAST_OVERRIDES, check_ok, launch, read_metrics

pytestmark = pytest.mark.e2e


def test_bf16_run_is_bf16_everywhere(tmp_path: Path, model_cache: Path):
    out = tmp_path / "run"
    overrides = [*FAST_OVERRIDES, f"output_dir={out}", f"model.cache_dir={model_cache}"]
    overrides += ["model.dtype=bfloat16", "algo.kl_coef=0.01", "trainer.max_steps=2"]
    overrides += ["reward.heads=[{head: implicit_prm, kwargs: {lr: 1.0e-4}}]"]
    check_ok(launch(overrides))
    first = read_metrics(out)[1]
    assert first["train/kl"] == 0.0, first  # policy == reference, both bf16
    assert first["head/implicit_prm/r_phi"] == 0.0, first  # PRM == its reference
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
