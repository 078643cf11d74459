from __future__ import annotations

import re
from pathlib import Path

import pytest

from rl.config import load_config
from rl.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_quickstart_loads_and_overrides_apply():
    cfg = load_config(QUICKSTART, ["trainer.max_steps=20", "deepspeed.zero_stage=3"])
    assert cfg.trainer.max_steps == 20
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.reward.functions[0].fn == "arith"


def test_yaml_exponent_strings_become_floats():
    cfg = load_config(QUICKSTART, ["optim.lr=1e-3"])  # YAML 1.1 reads 1e-3 as a string
    assert cfg.optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.max_step=3",
            "unknown config key 'trainer.max_step' (did you mean 'trainer.max_steps'?)",
        ),
        ("trainr.max_steps=3", "unknown config key 'trainr' (did you mean 'trainer'?)"),
        ("trainer.max_steps=many", "trainer.max_steps: expected int, got 'many'"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("algo.loss_agg=sum", "algo.loss_agg: 'sum' is not one of ['token_mean', 'seq_mean']"),
        (
            "reward.functions=[{fn: arith, wieght: 2}]",
            "unknown config key 'reward.functions.0.wieght'",
        ),
        ("rollout.group_size=1", "rollout.group_size: must be at least 2"),
        ("trainer.max_steps", "is not of the form key=value"),
    ],
)
def test_bad_config_names_the_key(override: str, message: str):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert message in str(err.value)


def test_tis_with_engine_old_logprobs_is_refused():
    overrides = ["rollout.backend={name: vllm, old_logprobs: engine, tis_cap: 2.0}"]
    with pytest.raises(ConfigError, match="tis_cap with rollout.backend.old_logprobs=engine"):
        load_config(QUICKSTART, overrides)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.old_logprobs=engine", "rollout.old_logprobs=engine needs rollout.backend=vllm"),
        ("rollout.tis_cap=2.0", "rollout.tis_cap=2.0 needs rollout.backend=vllm, got"),
        ("rollout.backend.tis_cap=2.0", "rollout.backend=transformers has no option 'tis_cap'"),
    ],
)
def test_engine_logprob_options_need_vllm(override: str, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(QUICKSTART, [override])


def test_missing_vllm_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    import sys

    from rl.rollout.vllm_backend import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match="rollout.backend=vllm needs vLLM.*install it with: pip"):
        import_vllm()


def test_architecture_vllm_cannot_load_is_named(tmp_path: Path):
    import json

    import vllm

    from rl.rollout.vllm_backend import check_architecture

    config = {"architectures": ["NoSuchModelForCausalLM"], "model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="cannot load architecture NoSuchModelForCausalLM"):
        check_architecture(str(tmp_path), vllm)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps: must be at least 1, got 0"),
        (
            "trainer.keep_checkpoints=-1",
            "trainer.keep_checkpoints: must be at least 0 (0 = keep all), got -1",
        ),
        ("trainer.collective_timeout_s=0", "trainer.collective_timeout_s: must be positive"),
        ("reward.timeout_s=-1", "reward.timeout_s: must be positive"),
        ("reward.on_error=skip", "reward.on_error"),
    ],
)
def test_fault_settings_bounds(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
