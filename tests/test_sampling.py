"""Rollouts sample exactly as configured and stop where they should: a checkpoint's own
generation defaults never leak in, every stop id ends a response, and a response cut at
`max_new_tokens` is flagged."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from rl.config import load_config
from rl.core.errors import ConfigError
from rl.engine.forward import response_logprobs
from rl.engine.start_model import build_tokenizer
from rl.rollout.backend import (
    DecodingSettings,
    SamplingSettings,
    TransformersRollout,
    response_mask_until_eos,
    stopped,
    unique_ids,
)
from rl.rollout.backend_specs import TransformersBackend
from rl.setup import stop_token_ids
from tests.models import tiny_llama

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """A random 1-layer Llama with the builtin tokenizer; its generation config asks for
    temperature 0.6, top-k 3 and a repetition penalty, as real checkpoints' configs do."""
    tok = build_tokenizer()
    model = tiny_llama(len(tok), pad_token_id=tok.pad_token_id).eval()
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_k=3, repetition_penalty=1.5, min_new_tokens=5
    )
    return model, tok


def test_checkpoint_defaults_do_not_leak_into_sampling(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    backend = TransformersRollout(tok, batch_size=4, synced_gpus=False, sampler_logprobs=True)
    torch.manual_seed(1)
    batch = backend.rollout(model, PROMPTS, ["a", "b", "c"], {}, SamplingSettings(12, 1.0, 1.0), 4)
    assert batch.behaviour_logprobs is not None
    with torch.no_grad():
        trainer = response_logprobs(model, batch, temperature=1.0)  # [B, Tr] teacher-forced
    mask = batch.response_mask.bool()
    diff = (batch.behaviour_logprobs - trainer).abs()[mask]
    # temperature 0.6, top-k 3 or the repetition penalty would each move these by far more
    assert float(diff.max()) < 1e-4, float(diff.max())
    assert model.generation_config.temperature == 0.6  # the model's own config is restored


def test_every_stop_id_ends_a_response(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    greedy = SamplingSettings(6, 1.0, 1.0, greedy=True)
    plain = TransformersRollout(tok, batch_size=4, synced_gpus=False)
    free = plain.rollout(model, PROMPTS, ["a", "b", "c"], {}, greedy, 1)
    first = int(free.response_ids[0, 0])  # what greedy decoding emits first for prompt 0
    assert first not in plain.eos_ids
    stopping = TransformersRollout(tok, batch_size=4, synced_gpus=False, stop_token_ids=[first])
    out = stopping.rollout(model, PROMPTS, ["a", "b", "c"], {}, greedy, 1)
    assert out.response_mask[0].tolist()[:2] == [1.0, 0.0]  # the stop token itself is kept
    assert out.truncated is not None and not bool(out.truncated[0])
    assert free.truncated is not None and bool(free.truncated[0])  # 6 tokens, no stop: cut


def test_stop_helpers_by_hand() -> None:
    eos, im_end = 2, 7
    responses = torch.tensor([[5, im_end, 0], [5, 6, 8], [eos, 0, 0]])
    assert response_mask_until_eos(responses, [eos, im_end]).tolist() == [
        [1, 1, 0],
        [1, 1, 1],
        [1, 0, 0],
    ]
    assert stopped(responses, [eos, im_end]).tolist() == [True, False, True]
    assert unique_ids(2, [7, 2], None, [9]) == [2, 7, 9]


def test_stop_ids_come_from_the_generation_config_and_the_run() -> None:
    tok = build_tokenizer()
    policy = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[2, 7]))
    cfg = load_config(None, ["rollout.stop_token_ids=[9]"])
    assert stop_token_ids(cfg, tok, policy) == [2, 7, 9]
    bad = load_config(None, [f"rollout.stop_token_ids=[{len(tok)}]"])
    with pytest.raises(ConfigError, match=f"rollout.stop_token_ids: {len(tok)} is outside"):
        stop_token_ids(bad, tok, policy)


def test_top_k_is_applied_as_configured(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    backend = TransformersRollout(tok, batch_size=4, synced_gpus=False)
    top1 = SamplingSettings(8, 1.0, 1.0, top_k=1)  # top-1 sampling is greedy decoding
    greedy = SamplingSettings(8, 1.0, 1.0, greedy=True)
    torch.manual_seed(3)
    sampled = backend.rollout(model, PROMPTS, ["a", "b", "c"], {}, top1, 2)
    argmax = backend.rollout(model, PROMPTS, ["a", "b", "c"], {}, greedy, 2)
    assert torch.equal(sampled.input_ids, argmax.input_ids)
    assert backend.generation_config(top1).top_k == 1
    assert backend.generation_config(SamplingSettings(8, 1.0, 1.0)).top_k == 0
    assert top1.describe() == "temperature=1.0 top_p=1.0 top_k=1 max_new_tokens=8"
    assert greedy.describe() == "greedy max_new_tokens=8"


@pytest.mark.parametrize("override", ["rollout.top_k=5", "rollout.top_p=0.9"])
def test_truncated_sampling_with_engine_logprobs_is_refused(override: str) -> None:
    from tests.launcher import REPO

    overrides = ["rollout.backend=vllm", "rollout.tis_cap=2.0", override]
    with pytest.raises(ConfigError, match=re.escape(f"{override} with the engine")):
        load_config(REPO / "configs" / "quickstart.yaml", overrides)
    with pytest.raises(
        ConfigError, match=re.escape("rollout.top_k: must be at least 0 (0 = off), got -1")
    ):
        load_config(REPO / "configs" / "quickstart.yaml", ["rollout.top_k=-1"])


def _responses(backend: TransformersRollout, model: Any, greedy: bool) -> tuple[list, list]:
    """(response token lists, sampler log-prob lists) of one seeded generation."""
    settings = SamplingSettings(10, 1.0, 1.0, greedy=greedy)
    torch.manual_seed(3)
    out = backend.generate_tokens(model, [p for p in PROMPTS for _ in range(3)], settings)
    responses = out.input_ids[:, out.prompt_length :]
    keep = out.response_mask.bool()
    assert out.logprobs is not None
    return (
        [r[m].tolist() for r, m in zip(responses, keep, strict=True)],
        [lp[m] for lp, m in zip(out.logprobs, keep, strict=True)],
    )


@pytest.mark.parametrize(
    "decoding",
    [
        DecodingSettings(cache="static"),
        pytest.param(
            DecodingSettings(cache="static", compile=True, prompt_multiple=16),
            marks=pytest.mark.e2e,  # compiling the decoding step takes ~30 s on a CPU
        ),
    ],
    ids=["static", "static-compiled"],
)
def test_static_and_compiled_decoding_sample_the_same_tokens(
    tiny: tuple[Any, Any], decoding: DecodingSettings
) -> None:
    """The same seed gives the same tokens and sampler log-probs as the dynamic cache (the
    path every run used before), sampled and greedy, with prompts padded wider or not."""
    model, tok = tiny
    plain = TransformersRollout(tok, batch_size=4, synced_gpus=False, sampler_logprobs=True)
    fast = TransformersRollout(
        tok, batch_size=4, synced_gpus=False, sampler_logprobs=True, decoding=decoding
    )
    for greedy in (False, True):
        want_tokens, want_logprobs = _responses(plain, model, greedy)
        got_tokens, got_logprobs = _responses(fast, model, greedy)
        assert got_tokens == want_tokens
        for got, want in zip(got_logprobs, want_logprobs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_decoding_needs_the_static_cache() -> None:
    with pytest.raises(ConfigError, match=r"rollout.backend.compile: needs rollout.backend"):
        load_config("configs/quickstart.yaml", ["rollout.backend.compile=true"])
    cfg = load_config("configs/quickstart.yaml", ["rollout.backend={cache: static, compile: true}"])
    assert cfg.rollout.backend == TransformersBackend(cache="static", compile=True)
