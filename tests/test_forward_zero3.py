"""Chunked log-probs through an output layer partitioned by ZeRO-3, on two gloo ranks: the
output layer never runs over more than one chunk of positions (the plain path ran it over
every response position at once: [batch, tokens, vocabulary] logits), and the log-probs,
the entropy and every parameter's gradient equal the plain path's, with gradients on and off."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tests.launcher import free_port

pytestmark = pytest.mark.e2e  # two DeepSpeed processes: with the slow tests

CHUNK = 2
PROMPT, RESPONSE = 3, 6


def _engine(tied: bool) -> Any:
    import deepspeed

    from tests.models import tiny_llama

    model = tiny_llama(40, num_layers=1, tie_word_embeddings=tied)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    return engine


def _pass(tied: bool, partitioned_path: bool) -> dict[str, Any]:
    """Log-probs, entropy, full gradients and the widest output-layer call of one pass."""
    from deepspeed.utils import safe_get_full_grad

    import rl.engine.forward as fw

    engine = _engine(tied)
    widths: list[int] = []
    layer = engine.module.get_output_embeddings()
    hook = layer.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 40, (2, PROMPT + RESPONSE), generator=gen)
    batch = fw._Tokens(ids, torch.ones_like(ids), PROMPT)
    original = fw._partitioned_output_layer
    if not partitioned_path:
        fw._partitioned_output_layer = lambda hf_model: None  # the plain path, as before
    try:
        with torch.no_grad():  # the reference / old log-probs pass: the weight gathered once
            no_grad, _ = fw.response_logprobs_and_entropy(engine, batch, 0.7, chunk_tokens=CHUNK)
        widths.clear()
        logp, ent = fw.response_logprobs_and_entropy(
            engine, batch, 0.7, entropy=True, chunk_tokens=CHUNK
        )
        assert ent is not None
        weights = torch.linspace(-1.0, 1.0, RESPONSE)
        engine.backward((logp * weights).sum() + 0.3 * ent.sum())
    finally:
        fw._partitioned_output_layer = original
        hook.remove()
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    return {
        "logp": logp.detach(), "no_grad": no_grad, "ent": ent.detach(), "grads": grads,
        "widest": max(widths),  # the pass with gradients
    }  # fmt: skip


def _rank(rank: int, port: int, tied: bool, out: dict[int, Any]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    chunked, plain = _pass(tied, partitioned_path=True), _pass(tied, partitioned_path=False)
    result = {"widest": (chunked["widest"], plain["widest"])}
    for key in ("logp", "ent", "no_grad"):
        result[key] = float((chunked[key] - plain["logp" if key == "no_grad" else key]).abs().max())
    result["grads"] = {
        name: float((g - plain["grads"][name]).abs().max() / plain["grads"][name].abs().max())
        for name, g in chunked["grads"].items()
    }
    out[rank] = result
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zero3_output_layer_runs_chunk_by_chunk_with_the_same_gradients(tied: bool) -> None:
    out: dict[int, Any] = mp.Manager().dict()
    mp.spawn(_rank, args=(free_port(), tied, out), nprocs=2, join=True)
    for rank in (0, 1):
        result = out[rank]
        assert result["widest"] == (CHUNK, RESPONSE + 1), result["widest"]
        assert max(result[key] for key in ("logp", "ent", "no_grad")) < 1e-5, result
        worst = max(result["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-4, worst
