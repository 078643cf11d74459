"""Step spans from generated token ids (incremental decoding), and the trainer's checks on
reward heads and credit schemes."""

from __future__ import annotations

import pytest
import torch

from rl.config import load_config
from rl.core.errors import ConfigError
from rl.core.types import RolloutBatch
from rl.rollout.steps import batch_steps, decode_offsets, response_step_spans


def _bpe_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.decoder = decoders.BPEDecoder()
    corpus = ["Add 2.\n\nThen 3.\nThe sum is 5.\n", "Add 4.\n\nThen 1.\nThe sum is 5.\n"] * 50
    trainer = trainers.BpeTrainer(vocab_size=30, special_tokens=["[UNK]", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


def test_spans_from_generated_ids_with_merged_newlines() -> None:
    tok = _bpe_tokenizer()
    text = "Add 2.\n\nThen 1.\nThe sum is 3."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    decoded, offsets = decode_offsets(tok, ids)
    assert decoded == text
    assert offsets[-1][0] == offsets[-1][1] == len(text)  # EOS decodes to nothing
    pieces = [decoded[a:b] for a, b in offsets]
    assert "".join(pieces) == text
    assert any("\n" in p and p.strip("\n") for p in pieces)  # the tokenizer merged a "\n"
    spans = response_step_spans(tok, ids)
    steps = ["".join(pieces[a : b + 1]) for a, b in spans]
    assert [s.strip("\n") for s in steps] == ["Add 2.", "Then 1.", "The sum is 3."]
    assert spans[-1][1] == len(ids) - 1  # EOS closes the last step


def test_no_delimiter_is_one_step_and_padding_is_off() -> None:
    tok = _bpe_tokenizer()
    ids = tok("The sum is 5.", add_special_tokens=False)["input_ids"]
    n = len(ids)
    pad = tok.eos_token_id
    batch = RolloutBatch(
        input_ids=torch.tensor([[1, *ids, pad, pad]]),
        attention_mask=torch.ones(1, n + 3, dtype=torch.long),
        response_mask=torch.tensor([[1.0] * n + [0.0, 0.0]]),
        prompt_length=1,
        prompts=["p"],
        completions=["The sum is 5."],
    )
    step_end, step_id = batch_steps(tok, batch)
    assert step_id.tolist() == [[0] * n + [-1, -1]]
    assert step_end.tolist() == [[0.0] * (n - 1) + [1.0, 0.0, 0.0]]


def test_credit_and_head_config_errors() -> None:
    from rl.trainer.loop import build_heads, resolve_credit

    cfg = load_config(None, ["algo.credit=prime"])
    with pytest.raises(ConfigError, match="algo.credit=prime needs at least one"):
        resolve_credit(cfg, [])
    assert resolve_credit(load_config(None), []).name == "outcome"
    spec = "examples.custom_head:WellFormedSteps"
    cfg = load_config(None, [f"reward.heads=[{{head: '{spec}'}}, {{head: '{spec}'}}]"])
    with pytest.raises(ConfigError, match="two heads are named 'well_formed_steps'"):
        build_heads(cfg)
    cfg = load_config(None, [f"reward.heads=[{{head: '{spec}'}}]"])
    assert resolve_credit(cfg, build_heads(cfg)).name == "sum"  # the head's default_credit
