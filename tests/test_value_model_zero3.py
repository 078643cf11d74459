"""Value models (the PPO critic, the PAV verifier) under ZeRO-3 on two gloo ranks: loaded
partitioned over the ranks as they load (each rank holds about half the backbone) instead of
whole on every rank, and the partitioned model computes the values of the whole one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tests.launcher import free_port

pytestmark = pytest.mark.e2e  # two DeepSpeed processes: with the slow tests

ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "train_batch_size": 2,
    "zero_optimization": {"stage": 3},
}
IDS = [[5, 9, 3, 7, 2, 11]]


def _rank(rank: int, port: int, policy: str, saved: str, out: dict[int, Any]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    import deepspeed

    from rl.engine.deepspeed_engine import create_reference
    from rl.engine.value_model import load_value_model, value_model_from_policy

    deepspeed.init_distributed(dist_backend="gloo")
    fresh = value_model_from_policy(policy, torch.float32, ZERO3)
    model, _ = load_value_model(saved, torch.float32, ZERO3)
    row: dict[str, Any] = {}
    for name, value_model in (("fresh", fresh), ("loaded", model)):
        params = list(value_model.backbone.parameters())
        row[name] = (
            all(hasattr(p, "ds_id") for p in params),
            sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
            sum(p.ds_numel for p in params if hasattr(p, "ds_numel")),
        )
    engine = create_reference(model, ZERO3)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        row["values"] = engine(ids, torch.ones_like(ids)).tolist()
    out[rank] = row
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def saved_value_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny causal-LM policy, a value model from it with a non-zero head)."""
    from rl.engine import start_model as sm
    from rl.engine.value_model import save_value_model, value_model_from_policy
    from tests.models import tiny_llama

    tok = sm.build_tokenizer()
    root = tmp_path_factory.mktemp("zero3_value")
    policy, saved = root / "policy", root / "value"
    model = tiny_llama(len(tok), num_layers=2, pad_token_id=tok.pad_token_id)
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    value_model = value_model_from_policy(policy)
    torch.nn.init.normal_(value_model.value_head.weight, std=0.5)
    save_value_model(value_model, tok, saved)
    return policy, saved


def test_value_models_load_partitioned_under_zero3(saved_value_model: tuple[Path, Path]) -> None:
    from rl.engine.value_model import load_value_model

    policy, saved = saved_value_model
    out: dict[int, Any] = mp.Manager().dict()
    mp.spawn(_rank, args=(free_port(), str(policy), str(saved), out), nprocs=2, join=True)
    whole, _ = load_value_model(saved)
    with torch.no_grad():
        ids = torch.tensor(IDS)
        want = whole(ids, torch.ones_like(ids))
    for rank in (0, 1):
        for name in ("fresh", "loaded"):
            partitioned, local, full = out[rank][name]
            assert partitioned, (rank, name)  # every backbone parameter is a ZeRO-3 one
            assert full == sum(p.numel() for p in whole.backbone.parameters())
            assert local <= full // 2 + 64, (rank, name, local, full)  # about half here
        torch.testing.assert_close(torch.tensor(out[rank]["values"]), want, rtol=1e-5, atol=1e-6)
