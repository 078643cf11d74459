"""Tests for rl.data: loading rows, preparing prompts, the resumable sampler and sharding."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rl.core.errors import ConfigError, DataError
from rl.data.prompts import (
    PromptSampler,
    batch_columns,
    load_rows,
    prepare_prompts,
    shard,
)

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]
WORDS += "what is one plus two three a b c d e f g".split()
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS that adds <s> (id 1) as BOS to plain text."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = chat_template
    return fast


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(source: str | Path, n: int | None = None, split: str = "train") -> list[dict[str, Any]]:
    return load_rows(str(source), split=split, n=n, seed=0, task_kwargs={})


ROWS = [{"question": f"what is {w}", "answer": str(i)} for i, w in enumerate("abcdef")]


# ---- loading ---------------------------------------------------------------------------------


def test_jsonl_loads_rows_and_caps_n(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load(path) == ROWS
    assert load(path, n=2) == ROWS[:2]


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert load(path) == ROWS[:2]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 3: invalid JSON") as e:
        load(path)
    assert "\n" not in str(e.value)


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], [1, 2]])
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        load(path)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "missing.parquet"])
def test_missing_file_names_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=f"not found: .*{name}"):
        load(tmp_path / name)


def test_datasets_json_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    assert load(path, n=4) == ROWS[:4]
    assert load(path, split="test") == ROWS  # a single file is loaded as the requested split


def test_datasets_save_to_disk_dir(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load(tmp_path / "ds", n=3) == ROWS[:3]
    DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_list(ROWS[:2])).save_to_disk(
        str(tmp_path / "dd")
    )
    assert load(tmp_path / "dd", split="test") == ROWS[:2]
    with pytest.raises(DataError, match="has no split 'validation'"):
        load(tmp_path / "dd", split="validation")


def test_missing_local_dir_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found: .*no-such-dir"):
        load(tmp_path / "no-such-dir")


def test_unloadable_dataset_is_one_line_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json at all\n")
    with pytest.raises(DataError, match="cannot load dataset .*bad.json") as e:
        load(path)
    assert "\n" not in str(e.value)


def test_builtin_delegates_to_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_builtin_rows(name: str, split: str, n: int, seed: int, **kw: Any) -> list[dict]:
        calls.append((name, split, n, seed, kw))
        return [{"prompt": "what is one plus two", "answer": "3"}] * n

    fake = types.ModuleType("rl.tasks")
    fake.builtin_rows = fake_builtin_rows  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rl.tasks", fake)
    rows = load_rows("builtin:arith", split="test", n=2, seed=7, task_kwargs={"digits": 3})
    assert len(rows) == 2 and rows[0]["answer"] == "3"
    assert calls == [("arith", "test", 2, 7, {"digits": 3})]


# ---- preparing prompts -----------------------------------------------------------------------


def prep(rows: list[dict[str, Any]], tok: Any, **kw: Any) -> tuple[list[Any], int]:
    args: dict[str, Any] = dict(
        source="d.jsonl",
        prompt_column="question",
        answer_column="answer",
        max_prompt_tokens=64,
        apply_chat_template="auto",
    )
    args.update(kw)
    return prepare_prompts(rows, tok, **args)


def test_chat_template_applied_with_single_bos() -> None:
    tok = make_tokenizer()
    prepared, skipped = prep([{"question": "what is one", "answer": 1}], tok)
    assert skipped == 0
    row = prepared[0]
    assert row.text == "<s><|user|> what is one <|assistant|>"
    assert row.prompt_ids == [1, 4, 6, 7, 8, 5]  # exactly one BOS
    assert row.answer == "1" and row.index == 0
    assert row.columns == {"question": "what is one", "answer": "1"}


def test_messages_column_used_as_conversation() -> None:
    msgs = [{"role": "system", "content": "a b"}, {"role": "user", "content": "c"}]
    prepared, _ = prep([{"question": msgs, "answer": "x"}], make_tokenizer())
    assert prepared[0].text == "<s><|system|> a b <|user|> c <|assistant|>"


def test_no_template_adds_bos_once() -> None:
    tok = make_tokenizer(chat_template=None)
    prepared, _ = prep([{"question": "what is one", "answer": "1"}], tok)  # auto -> off
    assert prepared[0].text == "what is one"
    assert prepared[0].prompt_ids == [1, 6, 7, 8]
    rows = [{"question": "what is one"}]
    prepared, _ = prep(rows, make_tokenizer(), apply_chat_template=False, answer_column=None)
    assert prepared[0].text == "what is one" and prepared[0].answer is None


def test_template_forced_without_template_is_config_error() -> None:
    with pytest.raises(ConfigError, match="apply_chat_template"):
        prep(ROWS, make_tokenizer(chat_template=None), apply_chat_template=True)


def test_messages_without_template_is_data_error() -> None:
    rows = [{"question": [{"role": "user", "content": "a"}], "answer": "1"}]
    with pytest.raises(DataError, match="row 0: column 'question' holds chat messages"):
        prep(rows, make_tokenizer(), apply_chat_template=False)


def test_missing_prompt_column_names_row_and_column() -> None:
    rows = [dict(r) for r in ROWS]
    rows[4] = {"q": "a", "answer": "1"}
    with pytest.raises(DataError) as e:
        prep(rows, make_tokenizer())
    assert str(e.value) == "d.jsonl row 4: missing column 'question' (columns: q, answer)"


def test_missing_answer_column_names_row_and_column() -> None:
    rows = [dict(r) for r in ROWS]
    del rows[2]["answer"]
    with pytest.raises(DataError, match=r"d.jsonl row 2: missing column 'answer' \(columns: "):
        prep(rows, make_tokenizer())


def test_answer_column_alias_and_types() -> None:
    rows = [{"question": "a", "solution": 42}]
    prepared, _ = prep(rows, make_tokenizer(), answer_column="solution")
    assert prepared[0].answer == "42"
    assert prepared[0].columns == {"question": "a", "solution": 42, "answer": "42"}
    with pytest.raises(DataError, match="row 0: column 'solution' is null"):
        prep([{"question": "a", "solution": None}], make_tokenizer(), answer_column="solution")
    with pytest.raises(DataError, match="row 0: column 'question' must be a string"):
        prep([{"question": 3, "solution": 1}], make_tokenizer(), answer_column="solution")


def test_long_prompts_skipped_and_counted() -> None:
    rows = [
        {"question": "a", "answer": "0"},
        {"question": "a b c d e f g", "answer": "1"},
        {"question": "b", "answer": "2"},
        {"question": "a b c d e", "answer": "3"},
    ]
    # templated length = 4 + words: 5, 11, 5, 9
    prepared, skipped = prep(rows, make_tokenizer(), max_prompt_tokens=9)
    assert skipped == 1
    assert [r.index for r in prepared] == [0, 2, 3]
    assert all(len(r.prompt_ids) <= 9 for r in prepared)


def test_batch_columns_repeats_row_major() -> None:
    prepared, _ = prep(ROWS[:2], make_tokenizer())
    cols = batch_columns(prepared, repeats=2)
    assert cols["answer"] == ["0", "0", "1", "1"]
    assert cols["question"] == ["what is a"] * 2 + ["what is b"] * 2


# ---- sampler ---------------------------------------------------------------------------------


def test_sampler_deterministic_and_permutation() -> None:
    a, b = PromptSampler(10, seed=3), PromptSampler(10, seed=3)
    first = a.take(10)
    assert first == b.take(10)
    assert sorted(first) == list(range(10))
    assert PromptSampler(10, seed=4).take(10) != first


def test_sampler_crosses_epochs() -> None:
    s = PromptSampler(5, seed=0)
    got = s.take(3) + s.take(4) + s.take(3)
    assert sorted(got[:5]) == list(range(5)) and sorted(got[5:]) == list(range(5))
    assert got[:5] != got[5:]  # epoch 1 is a different permutation (seed + 1)
    assert s.epoch == 2 and s.state_dict()["consumed"] == 10
    assert PromptSampler(5, seed=0).take(10) == got


def test_sampler_state_dict_resumes_identically() -> None:
    ref = PromptSampler(7, seed=11)
    ref.take(9)
    expected = ref.take(12)

    run = PromptSampler(7, seed=11)
    run.take(9)
    state = run.state_dict()
    resumed = PromptSampler(7, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.take(12) == expected


def test_sampler_state_mismatch_errors() -> None:
    state = PromptSampler(7, seed=1).state_dict()
    with pytest.raises(DataError, match="7 prompts"):
        PromptSampler(8, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        PromptSampler(7, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="no prompts"):
        PromptSampler(0, seed=1)


def test_shard_contiguous_equal() -> None:
    idx = [9, 8, 7, 6, 5, 4]
    assert [shard(idx, r, 3) for r in range(3)] == [[9, 8], [7, 6], [5, 4]]
    assert shard(idx, 0, 1) == idx
    with pytest.raises(ConfigError, match="6 prompts evenly over 4 ranks"):
        shard(idx, 0, 4)
    with pytest.raises(ValueError):
        shard(idx, 3, 3)


def test_a_chat_template_that_does_not_render_names_the_row() -> None:
    from rl.engine.start_model import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = "{{ messages[0]['content'] | nosuchfilter }}"
    rows = [{"prompt": "3 +4", "answer": "0"}]
    with pytest.raises(
        DataError, match=r"data.jsonl row 0: the tokenizer's chat template does not"
    ):
        prepare_prompts(
            rows, tok, source="data.jsonl", prompt_column="prompt", answer_column="answer",
            max_prompt_tokens=64, apply_chat_template=True,
        )  # fmt: skip


def test_message_lists_in_the_wrong_shape_name_the_row() -> None:
    wrong_key = [{"role": "user", "text": "a"}]
    with pytest.raises(DataError, match=r"d.jsonl row 0: column 'question' must be a string or"):
        prep([{"question": wrong_key, "answer": "1"}], make_tokenizer())
    ends_with_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    with pytest.raises(DataError, match=r"d.jsonl row 1: .* does not render: Invalid role"):
        prep([ROWS[0], {"question": ends_with_system, "answer": "1"}], make_tokenizer())


def test_a_final_assistant_turn_is_continued() -> None:
    msgs = [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prepared, _ = prep([{"question": msgs, "answer": "x"}], make_tokenizer())
    assert prepared[0].text == "<s><|user|> c <|assistant|> d"  # no new generation prompt


def test_builtin_eval_prompts_do_not_depend_on_the_run_seed() -> None:
    from rl.config import load_config
    from rl.engine.start_model import build_tokenizer
    from rl.setup import prompt_rows

    tok = build_tokenizer()
    texts = {}
    for seed in (0, 1):
        cfg = load_config(None, [f"seed={seed}", "data.eval_size=16", "data.train_size=16"])
        texts[seed] = (
            [r.text for r in prompt_rows(cfg, tok, "eval")[0]],
            [r.text for r in prompt_rows(cfg, tok, "train")[0]],
        )
    assert texts[0][0] == texts[1][0]  # the same eval prompts for every seed
    assert texts[0][1] != texts[1][1]  # training prompts still follow the run's seed
