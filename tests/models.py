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
