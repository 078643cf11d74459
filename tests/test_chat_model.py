"""builtin:chat-tiny and the task's chat / GSM8K form: tokenizer, template, saved checkpoint,
generation defaults, the committed JSONL, and the verifiers on chat responses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

import rl.engine.start_model as sm
from launch.make_chat_data import main as make_chat_data
from rewards.verifiers import exact_match, math_verify_reward
from rl.engine import chat_model
from rl.tasks import arith
from rl.tasks.arith import ArithConfig, ArithProblem, first_error_step
from rl.tasks.arith_chat import (
    as_arith_completion,
    chat_demonstration,
    chat_response,
    gsm8k_rows,
    question,
    reference,
)

REPO = Path(__file__).resolve().parent.parent

TINY = sm.TinyModelConfig(
    hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, sft_steps=3, sft_batch_size=4
)

PROBLEM = ArithProblem(start=3, ops=("+", "*", "-"), operands=(4, 2, 6), modulus=7)
"""3 +4 *2 -6 (mod 7): 3+4=0, 0*2=0, 0-6=1."""


def test_question_reference_and_response() -> None:
    assert question(PROBLEM) == "Compute 3 +4 *2 -6 from left to right, modulo 7."
    assert reference(PROBLEM) == "3+4=0\n0*2=0\n0-6=1\n#### 1"
    assert chat_response(PROBLEM) == "3+4=0\n0*2=0\n0-6=1\nThe answer is \\boxed{1}."
    # a slip at step 1 (0*2 read as 0+2=2) carries on: 2-6=3
    assert chat_response(PROBLEM, 1, 2) == "3+4=0\n0*2=2\n2-6=3\nThe answer is \\boxed{3}."


def test_chat_demonstration_slips_like_the_plain_task() -> None:
    problems = arith.sample_problems("train", 200, ArithConfig(), seed=0)
    chat = [chat_demonstration(p, random.Random(i), 0.6) for i, p in enumerate(problems)]
    plain = [arith.demonstration(p, random.Random(i), 0.6) for i, p in enumerate(problems)]
    assert [as_arith_completion(c) for c in chat] == plain
    labels = list(map(first_error_step, problems, map(as_arith_completion, chat)))
    assert any(label >= 0 for label in labels)


def test_verifiers_read_boxed_responses_against_gsm8k_references() -> None:
    gold = [reference(PROBLEM)] * 3
    responses = [chat_response(PROBLEM), chat_response(PROBLEM, 1, 2), "3+4=0\nno answer"]
    assert math_verify_reward([""] * 3, responses, gold) == [1.0, 0.0, 0.0]
    assert exact_match([""] * 3, responses, gold) == [1.0, 0.0, 0.0]


def test_gsm8k_rows_are_the_task_splits() -> None:
    rows = gsm8k_rows("eval", 5, ArithConfig(), seed=0)
    problems = arith.sample_problems("eval", 5, ArithConfig(), seed=0)
    assert [r["question"] for r in rows] == [question(p) for p in problems]
    assert [r["answer"].split("#### ")[-1] for r in rows] == [str(p.answer) for p in problems]


def test_committed_data_is_the_generator_output(tmp_path: Path) -> None:
    make_chat_data(["--out", str(tmp_path)])
    for split in arith.SPLITS:
        committed = (REPO / "data" / "arith_chat" / f"{split}.jsonl").read_text()
        assert (tmp_path / f"{split}.jsonl").read_text() == committed, split
    first = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])
    assert sorted(first) == ["answer", "question"]


def test_make_chat_data_rejects_a_bad_task_option(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="modulus"):
        make_chat_data(["--out", str(tmp_path), "--task", "modulus=1"])


def test_bpe_tokenizer_and_chatml_template() -> None:
    tok = chat_model.build_chat_tokenizer(TINY)
    for text in ["Compute 3 +4 from left to right, modulo 7.", "héllo 世界\n\n  x", "12 + 345"]:
        assert tok.decode(tok(text).input_ids) == text  # byte level: any text round-trips
    words = tok(" from left to right, modulo").input_ids
    assert len(words) < len(" from left to right, modulo") / 3  # merged by the trained BPE
    assert len(tok("12").input_ids) == 2  # digits one per token, as Qwen2's regex splits them
    assert tok("<|im_end|>").input_ids == [tok.eos_token_id]
    assert tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    assert tok.apply_chat_template(own_system, tokenize=False).count("system") == 1


def test_chat_tiny_checkpoint(tmp_path: Path) -> None:
    path = sm.ensure_start_model(tmp_path, TINY, show_progress=False, kind=sm.CHAT_TINY)
    assert path.name.startswith("chat-tiny-")
    assert sm.cache_key(TINY, sm.CHAT_TINY) != sm.cache_key(TINY)
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    generation = GenerationConfig.from_pretrained(path)
    # AutoTokenizer loads transformers' Qwen2Tokenizer for a qwen2 checkpoint; it must
    # tokenize exactly as the tokenizer the SFT used
    assert type(tok).__name__ == "Qwen2Tokenizer"
    built = chat_model.build_chat_tokenizer(TINY)
    rendered = built.apply_chat_template(
        [{"role": "user", "content": question(PROBLEM)}], tokenize=False, add_generation_prompt=True
    )
    for text in [rendered + chat_response(PROBLEM), "héllo 世界\n\n  x's 12,345.6"]:
        assert tok(text).input_ids == built(text).input_ids
    assert (len(tok), tok.eos_token_id, tok.pad_token_id) == (
        len(built),
        built.eos_token_id,
        built.pad_token_id,
    )
    assert config.model_type == "qwen2" and config.num_key_value_heads < config.num_attention_heads
    assert config.vocab_size % 64 == 0 and config.vocab_size > len(tok)  # padded, like Qwen's
    eos, pad = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert generation.eos_token_id == [eos, pad] and tok.eos_token_id == eos
    assert (generation.temperature, generation.top_p, generation.top_k) == (0.7, 0.8, 20)
    assert generation.repetition_penalty == 1.05
    info = json.loads((path / "build_info.json").read_text())
    assert info["kind"] == "chat-tiny"


def test_unknown_start_model_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chat-tiny"):
        sm.start_model_dir(tmp_path, TINY, "chat-huge")
