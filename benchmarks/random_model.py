"""Write a randomly initialised model at a real size, for throughput measurements.

    python benchmarks/random_model.py --out runs/qwen2-1.5b-random \\
        [--size qwen2-1.5b] [--dtype bfloat16]

The architecture is the named checkpoint's (`SIZES`, from its published config.json), the
weights random, the tokenizer builtin:chat-tiny's byte-level BPE (so the embedding rows
past it are never prompted, only sampled: a random model rarely stops, which gives
responses of `max_new_tokens`, what a throughput run wants). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES: dict[str, dict[str, int | float]] = {
    "qwen2-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0,
    ),
    "qwen2-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0,
    ),
}  # fmt: skip
"""Qwen2 configurations by name (tied embeddings, as both checkpoints have)."""


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl.engine.chat_model import build_chat_model, build_chat_tokenizer
    from rl.engine.tiny_config import TinyModelConfig

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="qwen2-1.5b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    tiny = TinyModelConfig()
    tok = build_chat_tokenizer(tiny)
    generation = build_chat_model(tiny, tok).generation_config  # EOS ids, pad
    config = Qwen2Config(
        **SIZES[args.size],
        tie_word_embeddings=True,
        bos_token_id=generation.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=generation.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))
    model.generation_config = generation
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: random {args.size} ({params / 1e9:.2f}B parameters, {args.dtype})")


if __name__ == "__main__":
    main()
