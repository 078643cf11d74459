"""The PRM convention and model (rl/prm/convention.py, rl/prm/model.py): rendering and tag
positions by hand, both head readings against hand-computed logits, save/load round trips,
and the one-line convention errors raised before any weights load."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from rl.core.errors import ConfigError
from rl.engine.start_model import build_tokenizer
from rl.prm.convention import (
    CONVENTION_FILE,
    PRMConvention,
    load_convention,
    render_ids,
    token_ids,
)
from rl.prm.fitting import add_tag_token, build_prm, prepare_tokenizer
from rl.prm.model import (
    HEAD_FILE,
    PRMModel,
    collate_solutions,
    gather_steps,
    load_prm,
    save_prm,
    step_probabilities,
)
from tests.models import tiny_llama


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def char_ids(tok: Any, text: str) -> list[int]:
    return [tok.convert_tokens_to_ids(c) for c in text]


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def test_render_ids_by_hand(tok: Any) -> None:
    conv = PRMConvention(step_tag="#", prompt_suffix=":")
    tag = tok.convert_tokens_to_ids("#")
    ids, pos = render_ids(conv, tok, tag, "1 +2", ["1+2=3", "Answer: 3"])
    # the char tokenizer adds no BOS: "1 +2:" (5) "1+2=3" (5) # "\n" "Answer: 3" (9) #
    want = char_ids(tok, "1 +2:1+2=3") + [tag] + char_ids(tok, "\nAnswer: 3") + [tag]
    assert ids == want
    assert pos == [10, 21]
    assert [ids[p] for p in pos] == [tag, tag]


def test_tag_inside_a_step_does_not_shift_positions(tok: Any) -> None:
    conv = PRMConvention(step_tag="#")
    tag = tok.convert_tokens_to_ids("#")
    ids, pos = render_ids(conv, tok, tag, "p", ["a#b", "c"])
    assert pos == [4, 7]  # "p" "a#b" # "\n" "c" #
    assert ids.count(tag) == 3  # the step's own "#" is read as text, not as a tag position


def test_chat_prompt_has_one_bos(tok: Any) -> None:
    conv = PRMConvention(step_tag="#", prompt_format="chat")
    tag = tok.convert_tokens_to_ids("#")
    ids, pos = render_ids(conv, tok, tag, "1 +2", ["x"])
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "1 +2"}], tokenize=False, add_generation_prompt=True
    )
    prefix = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids == [*prefix, tok.convert_tokens_to_ids("x"), tag]
    assert pos == [len(prefix) + 1]


def test_collate_and_gather() -> None:
    ids, mask, pos = collate_solutions([([5, 6, 7], [1, 2]), ([8], [0])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pos.tolist() == [[1, 2], [0, -1]]
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    torch.testing.assert_close(gather_steps(values, pos), torch.tensor([[0.2, 0.3], [0.4, 0.0]]))


# ----------------------------------------------------------------------------------------------
# The two readings, against hand-computed logits
# ----------------------------------------------------------------------------------------------


class FixedLM(nn.Module):
    """A stand-in causal LM whose logits and last hidden states are given tensors."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        super().__init__()
        self.fixed_logits, self.fixed_hidden = logits, hidden
        self.config = SimpleNamespace(hidden_size=hidden.shape[-1])
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, **kwargs: Any) -> Any:
        return SimpleNamespace(logits=self.fixed_logits)

    @property
    def base_model(self) -> Any:
        return lambda **kwargs: SimpleNamespace(last_hidden_state=self.fixed_hidden)


def test_label_tokens_log_odds_by_hand() -> None:
    from rl.prm.convention import TokenIds

    # vocabulary of 4; good = 2, bad = 3; logits [1, 2, 4]
    logits = torch.tensor([[[0.0, 9.0, 1.5, -0.5], [0.0, 0.0, -1.0, 2.0]]])
    model = PRMModel(
        FixedLM(logits, torch.zeros(1, 2, 3)),
        PRMConvention(step_tag="#"),
        TokenIds(tag=1, good=2, bad=3),
    )
    z = model(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    assert z[0].tolist() == pytest.approx([2.0, -3.0])  # 1.5 - (-0.5), -1 - 2
    # sigmoid(z) is the softmax over the two label tokens: e^1.5 / (e^1.5 + e^-0.5)
    want = math.exp(1.5) / (math.exp(1.5) + math.exp(-0.5))
    assert torch.sigmoid(z)[0, 0].item() == pytest.approx(want)


def test_two_class_log_odds_by_hand() -> None:
    from rl.prm.convention import TokenIds

    hidden = torch.tensor([[[1.0, 2.0], [-1.0, 0.5]]])  # [1, 2, H=2]
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # row 0 bad, row 1 good
        head.bias.copy_(torch.tensor([0.5, -0.25]))
    model = PRMModel(
        FixedLM(torch.zeros(1, 2, 4), hidden),
        PRMConvention(step_tag="#", head="two_class"),
        TokenIds(tag=1, good=None, bad=None),
        head,
    )
    z = model(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    # good - bad: (h1 - 0.25) - (h0 + 0.5)
    assert z[0].tolist() == pytest.approx([2.0 - 0.25 - 1.5, 0.5 - 0.25 - (-0.5)])


def test_label_tokens_on_a_real_lm_match_its_logits(tok: Any) -> None:
    lm = tiny_llama(len(tok), tie_word_embeddings=True)
    conv = PRMConvention(step_tag="#")
    ids = token_ids(conv, tok)
    model = PRMModel(lm, conv, ids).eval()
    input_ids, mask, _ = collate_solutions([render_ids(conv, tok, ids.tag, "1 +2", ["3"])], 0)
    with torch.no_grad():
        logits = lm(input_ids=input_ids, attention_mask=mask).logits
        z = model(input_ids, mask)
    assert ids.good is not None and ids.bad is not None
    torch.testing.assert_close(z, logits[..., ids.good] - logits[..., ids.bad])


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def make_prm(tok: Any, head: str, tag: str = "#", add: bool = False) -> PRMModel:
    conv = PRMConvention(step_tag=tag, head=head)  # type: ignore[arg-type]
    ids, grew = prepare_tokenizer(conv, tok, add, "test")
    return build_prm(tiny_llama(len(tok) - int(grew), seed=3), tok, conv, ids, grew, seed=0)


@pytest.mark.parametrize("head", ["label_tokens", "two_class"])
def test_save_load_round_trip(tmp_path: Path, tok: Any, head: str) -> None:
    model = make_prm(tok, head).eval()
    if head == "two_class":
        with torch.no_grad():  # a head far from its init, so a reload without it would differ
            model.class_head.weight.normal_()  # type: ignore[union-attr]
    prompts, steps = ["1 +2 *3", "4 -1"], [["1+2=3", "3*3=2"], ["4-1=3"]]
    before = step_probabilities(model, tok, prompts, steps)
    out = save_prm(model, tok, tmp_path / "prm")
    assert (out / CONVENTION_FILE).is_file()
    assert (out / HEAD_FILE).is_file() == (head == "two_class")
    loaded, tok2 = load_prm(out)
    assert loaded.convention == model.convention
    assert flat(step_probabilities(loaded, tok2, prompts, steps)) == pytest.approx(flat(before))
    assert [len(p) for p in before] == [2, 1]
    # saving again over it replaces it whole
    save_prm(model, tok, out)
    assert flat(step_probabilities(load_prm(out)[0], tok2, prompts, steps)) == pytest.approx(
        flat(before)
    )


def test_added_tag_token_round_trip(tmp_path: Path) -> None:
    tok = build_tokenizer()
    n = len(tok)
    model = make_prm(tok, "label_tokens", tag="<step>", add=True).eval()
    assert len(tok) == n + 1 and model.lm.get_input_embeddings().weight.shape[0] == n + 1
    assert model.ids.tag == n
    save_prm(model, tok, tmp_path / "prm")
    loaded, tok2 = load_prm(tmp_path / "prm")
    assert loaded.ids.tag == n and len(tok2) == n + 1
    got = step_probabilities(loaded, tok2, ["1 +2"], [["1+2=3"]])
    assert flat(got) == pytest.approx(flat(step_probabilities(model, tok, ["1 +2"], [["1+2=3"]])))


def test_add_tag_token_keeps_a_single_token_tag() -> None:
    tok = build_tokenizer()
    assert add_tag_token(tok, "#") is False
    assert add_tag_token(tok, "[[tag]]") is True


# ----------------------------------------------------------------------------------------------
# Convention errors: one line, before weights load
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def plain_lm_dir(tmp_path: Path, tok: Any) -> Path:
    """A causal LM directory with no saved convention (an off-the-shelf PRM)."""
    path = tmp_path / "lm"
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load model weights fails the test."""
    import transformers

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded before the convention was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def one_line_error(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_no_convention_and_no_tag(plain_lm_dir: Path, no_weights: None) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_prm(plain_lm_dir)
    text = one_line_error(excinfo)
    assert CONVENTION_FILE in text and "step_tag" in text and str(plain_lm_dir) in text


def test_multi_token_tag(plain_lm_dir: Path, no_weights: None) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_prm(plain_lm_dir, overrides={"step_tag": "<s>"})
    text = one_line_error(excinfo)
    assert "'<s>' is 3 tokens" in text and "step tag" in text


def test_multi_token_label_token(plain_lm_dir: Path, no_weights: None) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_prm(plain_lm_dir, overrides={"step_tag": "#", "good_token": "ok"})
    assert "good token 'ok' is 2 tokens" in one_line_error(excinfo)


def test_bad_head_name(plain_lm_dir: Path, no_weights: None) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_prm(plain_lm_dir, overrides={"step_tag": "#", "head": "three_class"})
    assert "'three_class'" in one_line_error(excinfo)
    with pytest.raises(ConfigError, match="three_class"):
        PRMConvention(step_tag="#", head="three_class")  # type: ignore[arg-type]


def test_saved_convention_unknown_key(tmp_path: Path) -> None:
    (tmp_path / CONVENTION_FILE).write_text(json.dumps({"step_tag": "#", "tagg": 1}))
    with pytest.raises(ConfigError, match="unknown PRM convention key 'tagg'"):
        load_convention(tmp_path)


def test_off_the_shelf_lm_with_a_tag_loads(plain_lm_dir: Path) -> None:
    model, _ = load_prm(plain_lm_dir, overrides={"step_tag": "#"})
    assert model.convention.step_tag == "#" and model.convention.head == "label_tokens"


def test_two_class_without_head_file(tmp_path: Path, tok: Any, no_weights: None) -> None:
    path = tmp_path / "lm"
    tok.save_pretrained(path)
    (path / CONVENTION_FILE).write_text(json.dumps({"step_tag": "#", "head": "two_class"}))
    with pytest.raises(ConfigError, match=f"no {HEAD_FILE}"):
        load_prm(path)
