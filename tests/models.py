"""Tiny random models for tests (never trained; only shapes and numerics matter)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab_size: int, num_layers: int = 1, seed: int = 0, **config: Any) -> Any:
    """A random Llama with hidden size 32, 2 heads and 64 positions (overridable)."""
    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    settings.update(config)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab_size, num_hidden_layers=num_layers, **settings)
    )


def chat_tokenizer() -> Any:
    """The shipped chat-tiny BPE tokenizer with a one-token `<step>` tag added (a PRM
    tokenizer that differs from arith-tiny's character tokenizer)."""
    from transformers import AutoTokenizer

    from rl.engine.start_model import SHIPPED_ROOT

    (directory,) = sorted(SHIPPED_ROOT.glob("chat-tiny-*"))
    tok = AutoTokenizer.from_pretrained(directory)
    tok.add_special_tokens({"additional_special_tokens": ["<step>"]})
    return tok


def build_prm(
    out: Any,
    tokenizer: Any,
    num_layers: int = 1,
    max_position_embeddings: int = 256,
    seed: int = 1,
    **convention: Any,
) -> Any:
    """A random tiny Llama read as a PRM in `convention` (`rl.prm.convention.PRMConvention`
    fields), saved with `save_prm` into `out`; returns `out`."""
    from rl.prm.convention import PRMConvention, token_ids
    from rl.prm.model import PRMModel, save_prm

    conv = PRMConvention(**convention)
    lm = tiny_llama(
        len(tokenizer),
        num_layers=num_layers,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
    )
    head = torch.nn.Linear(int(lm.config.hidden_size), 2) if conv.head == "two_class" else None
    return save_prm(PRMModel(lm, conv, token_ids(conv, tokenizer), head), tokenizer, out)
