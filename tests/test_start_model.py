"""The locally built tokenizer and tiny start model: round-trips, caching, reloading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rl.engine.start_model as sm
from rl.tasks.arith import ArithConfig, rows

TINY = sm.TinyModelConfig(
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    intermediate_size=32,
    sft_steps=3,
    sft_batch_size=4,
    task=ArithConfig(n_steps=2),
)


def test_tokenizer_round_trip() -> None:
    tok = sm.build_tokenizer()
    texts = [r["prompt"] for r in rows("train", 20, ArithConfig(), seed=0)]
    texts += ["3+4=7\n7*2=4\n4-7=7\nAnswer: 7", "  a b\n\nc  ", "Answer: 12\n"]
    for text in texts:
        ids = tok(text).input_ids
        assert len(ids) == len(text)  # one token per character, nothing added
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("\n").input_ids != tok(" ").input_ids


def test_chat_template() -> None:
    tok = sm.build_tokenizer()
    assert sm.prompt_text(tok, "3 +4") == "<bos>3 +4\n"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "1 +2"}, {"role": "assistant", "content": "Answer: 3"}],
        tokenize=True,
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "1 +2\nAnswer: 3"


def test_sft_batch_masks_prompt() -> None:
    tok = sm.build_tokenizer()
    ids, mask, labels = sm.sft_batch(tok, ["1 +2", "1 +2 *3"], ["Answer: 3", "x"])
    assert ids.shape == mask.shape == labels.shape == (2, 1 + 5 + 9 + 1)  # bos prompt resp eos
    n_prompt = len(tok("1 +2\n").input_ids) + 1  # + <bos>
    assert (labels[0, :n_prompt] == -100).all()
    assert tok.decode(labels[0, n_prompt:].tolist()) == "Answer: 3<eos>"
    assert mask[1].sum() == 1 + 8 + 1 + 1  # bos, "1 +2 *3\n", "x", eos


def test_loss_curve_means_equal_spans() -> None:
    curve = sm.loss_curve([4.0, 2.0, 1.0, 1.0, 0.5], points=2)  # spans of ceil(5 / 2) = 3
    assert curve == {"every_steps": 3, "mean_loss": [round(7 / 3, 4), 0.75]}
    assert sm.loss_curve([1.0, 3.0], points=12) == {"every_steps": 1, "mean_loss": [1.0, 3.0]}


def test_ensure_start_model_builds_caches_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sm.ensure_start_model(tmp_path, TINY, show_progress=False)
    info = json.loads((path / "build_info.json").read_text())
    curve = info["sft_loss_curve"]
    assert curve["every_steps"] == 1 and len(curve["mean_loss"]) == TINY.sft_steps
    mean = sum(curve["mean_loss"]) / TINY.sft_steps  # final_sft_loss: the last 20 steps' mean
    assert mean == pytest.approx(info["final_sft_loss"], abs=1e-3)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [path.name]  # no temp left

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached start model")

    monkeypatch.setattr(sm, "_build", no_rebuild)
    assert sm.ensure_start_model(tmp_path, TINY, show_progress=False) == path
    other = sm.TinyModelConfig(**{**TINY.__dict__, "seed": 1})
    assert sm.cache_key(other) != sm.cache_key(TINY)

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    assert tok.decode(tok("7*2=4\n").input_ids) == "7*2=4\n"
    enc = tok([sm.prompt_text(tok, "3 +4 *2")], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=5)
    assert out.shape[1] <= enc.input_ids.shape[1] + 5


def test_weights_digest_names_the_copy(tmp_path: Path) -> None:
    """Two builds of one recipe on one machine are the same weights (same digest, recorded in
    build_info.json); another seed is a different copy."""
    first = sm.ensure_start_model(tmp_path / "a", TINY, show_progress=False)
    again = sm.ensure_start_model(tmp_path / "b", TINY, show_progress=False)
    other = sm.TinyModelConfig(**{**TINY.__dict__, "seed": 1})
    other_path = sm.ensure_start_model(tmp_path / "c", other, show_progress=False)
    digest = sm.weights_digest(first)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert sm.weights_digest(again) == digest
    assert sm.weights_digest(other_path) != digest
    info = json.loads((first / "build_info.json").read_text())
    assert info["weights_sha256"] == digest
    (first / "model.safetensors").write_bytes(b"changed")
    assert sm.weights_digest(first) != digest


def test_cache_key_of_a_later_task_field() -> None:
    # operand_min was added after models were cached: at its default the key must not move
    # (this hash is the key of every cached default start model before the field existed)
    assert sm.cache_key(sm.TinyModelConfig()) == "0642f5cfe60b316c"
    task = ArithConfig(operand_min=1)
    assert sm.cache_key(sm.TinyModelConfig(task=task)) != sm.cache_key(sm.TinyModelConfig())


def ship_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digest: str | None) -> Path:
    """A shipped-models directory (monkeypatched) holding a build of TINY, its digest
    recorded as `digest` (the real one when None)."""
    built = sm.ensure_start_model(tmp_path / "cache", TINY, show_progress=False, source="build")
    shipped_root = tmp_path / "shipped"
    shutil.copytree(built, shipped_root / built.name)
    recorded = {built.name: {"weights_sha256": digest or sm.weights_digest(built)}}
    (shipped_root / "digests.json").write_text(json.dumps(recorded))
    monkeypatch.setattr(sm, "SHIPPED_ROOT", shipped_root)
    monkeypatch.setattr(sm, "DIGESTS_FILE", shipped_root / "digests.json")
    return shipped_root / built.name


def test_shipped_copy_is_used_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = ship_copy(tmp_path, monkeypatch, None)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("built a recipe that is shipped")

    monkeypatch.setattr(sm, "_build", no_build)
    assert sm.ensure_start_model(tmp_path / "empty", TINY, show_progress=False) == shipped
    assert sm.wait_for_start_model(tmp_path / "empty", TINY) == shipped
    assert not (tmp_path / "empty").exists()  # nothing built or cached
    line, as_recorded = sm.describe(shipped)
    assert as_recorded and "shipped copy" in line and "the recorded one" in line
    other = sm.TinyModelConfig(**{**TINY.__dict__, "seed": 1})  # another recipe: built
    with pytest.raises(AssertionError, match="built a recipe"):
        sm.ensure_start_model(tmp_path / "empty", other, show_progress=False)
    with pytest.raises(AssertionError, match="built a recipe"):  # source=build: always built
        sm.ensure_start_model(tmp_path / "empty", TINY, show_progress=False, source="build")


def test_a_copy_with_another_digest_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = ship_copy(tmp_path, monkeypatch, "0123456789abcdef")
    line, as_recorded = sm.describe(shipped)
    assert not as_recorded
    assert f"weights digest {sm.weights_digest(shipped)}, NOT the recorded 0123456789abcdef" in line
    built = sm.ensure_start_model(tmp_path / "cache", TINY, source="build")
    line, as_recorded = sm.describe(built)  # a build of the recorded recipe: same check
    assert not as_recorded and "built here" in line and "NOT the recorded" in line
    unrecorded = tmp_path / "cache" / "arith-tiny-0000000000000000"
    shutil.copytree(built, unrecorded)
    assert sm.describe(unrecorded) == (
        f"start model {unrecorded.name} (built here): weights digest "
        f"{sm.weights_digest(built)} (no digest recorded for this recipe)",
        True,
    )


def test_a_waiting_build_names_the_lock_and_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process waiting for another's build says once a minute which lock it waits on and
    who holds it; when the holder dies (its flock goes with it), the waiter builds."""
    monkeypatch.setattr(sm, "LOCK_REPORT_S", 0.5)
    final = sm.start_model_dir(tmp_path, TINY)
    lock_path = tmp_path / f"{final.name}.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(lock_path)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write('held by pid 4242'); f.flush(); print('locked', flush=True); time.sleep(3)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    lines: list[str] = []
    path = sm.ensure_start_model(tmp_path, TINY, show_progress=False, report=lines.append)
    holder.wait()
    assert path == final and (final / "build_info.json").exists()
    assert lines and all(str(lock_path) in line for line in lines), lines
    assert "held by pid 4242" in lines[0], lines


@pytest.mark.parametrize(
    ("rank", "local_rank", "builds"), [(0, 0, True), (1, 1, False), (8, 0, False)]
)
def test_only_global_rank_zero_builds_the_start_model(
    monkeypatch: pytest.MonkeyPatch, rank: int, local_rank: int, builds: bool
) -> None:
    """Several nodes: local rank 0 of node 2 (global rank 8) waits for rank 0's build rather
    than building beside it (the build lock is an flock, which network filesystems may not
    honour)."""
    from rl.config import load_config
    from rl.engine import models
    from rl.engine.deepspeed_engine import DistInfo

    calls: list[str] = []
    monkeypatch.setattr(
        sm, "ensure_start_model", lambda *a, **k: calls.append("build") or Path("m")
    )
    monkeypatch.setattr(
        sm, "wait_for_start_model", lambda *a, **k: calls.append("wait") or Path("m")
    )
    monkeypatch.setattr(sm, "describe", lambda path: ("start model m", True))
    cfg = load_config(None, [])
    models.builtin_start_model(cfg, DistInfo(rank, 16, local_rank))
    assert calls == (["build"] if builds else ["wait"])
