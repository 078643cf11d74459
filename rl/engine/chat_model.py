"""The pieces of `builtin:chat-tiny`: a start policy with the properties of a real chat model.

Built locally (no hub), with what a Qwen2.5-Instruct checkpoint ships:

- tokenizer: byte-level BPE trained with the `tokenizers` library on the chat-format
  demonstrations, with Qwen2's normalizer and pre-tokenizer (so transformers'
  `Qwen2Tokenizer`, which AutoTokenizer loads for every qwen2 checkpoint, tokenizes exactly
  as the SFT did: digits one per token, words and punctuation runs merged), <|endoftext|>
  (pad), <|im_start|>, <|im_end|> (EOS) as special tokens and a ChatML template that adds
  a default system message;
- model: Qwen2 architecture (grouped-query attention, tied embeddings) whose embedding
  matrix is padded past the tokenizer's length to a multiple of 64, as Qwen's are;
- generation_config.json: sampling defaults (temperature 0.7, top_p 0.8, top_k 20,
  repetition_penalty 1.05) and two EOS ids (<|im_end|>, <|endoftext|>), which the trainer
  must not pick up (it samples exactly as configured).

The SFT warm-up itself is `rl.engine.start_model`'s, on `chat_example` demonstrations.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from rl.engine.tiny_config import TinyModelConfig
from rl.tasks.arith import ArithProblem, sample_problems
from rl.tasks.arith_chat import chat_demonstration, question

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

SYSTEM_PROMPT = "You are a helpful assistant."
"""The system message the template adds when a conversation has none."""

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML: each turn is "<|im_start|>{role}\\n{content}<|im_end|>\\n"."""

BPE_VOCAB_SIZE = 512
"""Target vocabulary of the trained BPE (the 256 bytes, 3 special tokens, merges)."""

TOKENIZER_CORPUS_PROBLEMS = 2000
"""Train-split problems whose chat-format demonstrations the BPE is trained on."""

VOCAB_MULTIPLE = 64
"""The embedding matrix is padded to a multiple of this (Qwen pads 151,665 to 151,936)."""

SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
"""What the checkpoint's generation_config.json suggests (and the trainer ignores)."""


def chat_example(
    problem: ArithProblem, rng: random.Random, cfg: TinyModelConfig
) -> tuple[str, str]:
    """(user message, assistant response) of one SFT demonstration (the slip only)."""
    return question(problem), chat_demonstration(problem, rng, cfg.demo_error_rate)


def _corpus(cfg: TinyModelConfig) -> Iterator[str]:
    """Texts the BPE learns its merges from: rendered chat demonstrations."""
    rng = random.Random(f"bpe/{cfg.seed}")
    for problem in sample_problems("train", TOKENIZER_CORPUS_PROBLEMS, cfg.task, cfg.seed):
        user, response = chat_example(problem, rng, cfg)
        yield (
            f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
            f"{IM_START}assistant\n{response}{IM_END}\n"
        )


def build_chat_tokenizer(cfg: TinyModelConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `_corpus(cfg)` with Qwen2's text pipeline (NFC, its split
    regex, byte-level); ids 0-2 are the special tokens."""
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(cfg), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        padding_side="left",
        model_max_length=cfg.max_position_embeddings,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def padded_vocab_size(n_tokens: int) -> int:
    """`n_tokens` rounded up to a multiple of VOCAB_MULTIPLE."""
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_chat_model(cfg: TinyModelConfig, tok: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A random-init Qwen2 decoder sized by `cfg` (half as many key/value heads as query
    heads, tied embeddings, padded vocabulary) with a Qwen-style generation config."""
    torch.manual_seed(cfg.seed)
    eos, pad = tok.vocab[IM_END], tok.vocab[ENDOFTEXT]
    config = Qwen2Config(
        vocab_size=padded_vocab_size(len(tok)),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=max(1, cfg.num_heads // 2),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        do_sample=True, eos_token_id=[eos, pad], pad_token_id=pad, bos_token_id=pad,
        **SAMPLING_DEFAULTS,
    )  # fmt: skip
    return model
