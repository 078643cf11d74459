"""Randomly initialised models of a recipe's architecture, shrunk to run one training step on
a CPU: the same decoder family, query/key-value head counts (grouped-query attention),
biases and embedding tying as the named checkpoint (`rl.engine.memory_plan.
KNOWN_ARCHITECTURES`), with 2 layers, 8-wide heads and the shipped chat-tiny tokenizer
(ChatML, byte-level BPE) in place of the checkpoint's, so nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from tests.launcher import REPO

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SHRUNK_LAYERS = 2
SHRUNK_HEAD_WIDTH = 8


def shipped_chat_tiny() -> Path:
    """The chat-tiny build shipped in the package (its tokenizer is reused)."""
    (found,) = sorted((REPO / "rl" / "engine" / "start_models").glob("chat-tiny-*"))
    return found


def build_shrunk_model(name: str, out: Path) -> Path:
    """Save a random-init shrunk model of architecture `name` with the chat-tiny tokenizer
    into `out`; returns `out`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from rl.engine.chat_model import padded_vocab_size
    from rl.engine.memory_plan import KNOWN_ARCHITECTURES

    arch = KNOWN_ARCHITECTURES[name]
    tok = AutoTokenizer.from_pretrained(shipped_chat_tiny())
    hidden = arch.num_heads * SHRUNK_HEAD_WIDTH
    config = Qwen2Config(
        vocab_size=padded_vocab_size(len(tok)),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=SHRUNK_LAYERS,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_math_style_data(path: Path, rows: int = 16) -> Path:
    """`rows` arithmetic problems in MATH's columns (`problem`, and a `solution` ending in
    \\boxed{N}) from the chat quickstart's GSM8K-style data; returns `path`."""
    source = REPO / "data" / "arith_chat" / "train.jsonl"
    lines = source.read_text().splitlines()[:rows]
    with path.open("w") as out:
        for line in lines:
            row = json.loads(line)
            steps, answer = row["answer"].split("#### ")
            solution = f"{steps}The answer is \\boxed{{{answer.strip()}}}."
            out.write(json.dumps({"problem": row["question"], "solution": solution}) + "\n")
    return path


def write_gsm8k_style_data(path: Path, rows: int = 16) -> Path:
    """`rows` problems in GSM8K's columns (`question`, `answer` ending in `#### N`): the
    chat quickstart's data is in them already."""
    source = REPO / "data" / "arith_chat" / "train.jsonl"
    path.write_text("\n".join(source.read_text().splitlines()[:rows]) + "\n")
    return path
