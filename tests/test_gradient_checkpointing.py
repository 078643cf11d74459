"""`model.gradient_checkpointing` reaches every model the runs train: the critic, the
implicit PRM and the PAV verifier (the policy's is set in `load_policy`). The DeepSpeed
engine is replaced by a stand-in that keeps the model it was given."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import rl.pav.train as pav_train
from rl.config import load_config
from rl.engine import deepspeed_engine as eng
from rl.engine.deepspeed_engine import DistInfo
from tests.models import tiny_llama

PAV_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart_pav.yaml"


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy")
    tiny_llama(vocab_size=17).save_pretrained(path)
    return path


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The models handed to `create_policy_engine`, in order (the engine: a stand-in)."""
    models: list[Any] = []

    def create(model: Any, *args: Any, **kwargs: Any) -> Any:
        models.append(model)
        return SimpleNamespace(module=model)

    monkeypatch.setattr(eng, "create_policy_engine", create)
    return models


def critic_model(policy: Path, enabled: bool) -> None:
    from rl.trainer.critic import Critic

    Critic(
        policy_path=str(policy),
        ds_config={},
        path=None,
        dtype=torch.float32,
        lr=1e-5,
        betas=(0.9, 0.999),
        value_clip=0.2,
        micro_batch_size=1,
        gradient_checkpointing=enabled,
    )


def implicit_prm_model(policy: Path, enabled: bool) -> None:
    from rewards.heads import HeadContext
    from rewards.implicit_prm_head import ImplicitPRMHead

    ctx = HeadContext(
        cfg=None,
        dist=DistInfo(0, 1, 0),
        tokenizer=None,
        policy_path=str(policy),
        ds_config={},
        micro_batch_size=2,
        local_batch_size=2,
        reference=object(),  # the trainer's: no second model is built
        gradient_checkpointing=enabled,
    )
    ImplicitPRMHead().setup(ctx)


def pav_verifier_model(policy: Path, enabled: bool) -> None:
    cfg = load_config(
        PAV_CONFIG,
        [f"model.gradient_checkpointing={str(enabled).lower()}", "logging.progress_bar=false"],
    )
    pav_train.train_verifier(cfg, DistInfo(0, 1, 0), str(policy), [], [], pad_id=0)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("build", [critic_model, implicit_prm_model, pav_verifier_model])
def test_trained_models_checkpoint_activations_when_configured(
    tiny_policy: Path,
    built: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    build: Any,
    enabled: bool,
) -> None:
    monkeypatch.setattr(
        pav_train, "make_value_engine", lambda cfg, dist, model, ds_config: built.append(model)
    )
    monkeypatch.setattr(pav_train, "train_epoch", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(pav_train.eng, "full_state_dict", lambda engine: None)
    build(tiny_policy, enabled)
    (model,) = built
    assert model.is_gradient_checkpointing is enabled
