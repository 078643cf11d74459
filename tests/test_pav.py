"""PAV pieces: the value model on disk, the PAV heads' maths, MC prefixes/labels, MC records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rewards.pav as pav
import rl.engine.start_model as sm
import rl.pav.train as pav_train
from rewards.heads import HeadBatch, HeadContext, checked_score
from rl.config import load_config
from rl.core.errors import ConfigError
from rl.engine.deepspeed_engine import DistInfo
from rl.engine.value_model import (
    HEAD_FILE,
    ValueModel,
    load_value_model,
    save_value_model,
    value_model_from_policy,
)
from rl.pav.data import (
    SolutionRecord,
    append_records,
    collate,
    complete_prompts,
    q_table,
    read_records,
    solution_labels,
    step_prefixes,
    success_rates,
)
from rl.pav.train import (
    check_pav_config,
    cpu_copy,
    is_better,
    kept_row,
    plan_micro_batches,
    split_by_prompt,
    verifier_init,
)
from tests.models import tiny_llama

# ----------------------------------------------------------------------------------------------
# Value model on disk
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer Llama (hidden 32) with the builtin tokenizer, saved as a policy."""
    tok = sm.build_tokenizer()
    path = tmp_path_factory.mktemp("policy")
    tiny_llama(len(tok), tie_word_embeddings=True, pad_token_id=tok.pad_token_id).save_pretrained(
        path
    )
    tok.save_pretrained(path)
    return path


PAV_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart_pav.yaml"


def test_verifier_init_defaults_to_the_policy_and_checks_the_tokenizer(
    tiny_policy: Path, tmp_path: Path
) -> None:
    tok = sm.build_tokenizer()
    unset = load_config(PAV_CONFIG)
    assert verifier_init(unset, tok, "policy/dir") == "policy/dir"
    same = load_config(PAV_CONFIG, [f"pav.init_model={tiny_policy}"])
    assert verifier_init(same, tok, "policy/dir") == str(tiny_policy)

    other_vocab = {**tok.get_vocab(), "<extra>": len(tok)}
    other = type("Other", (), {"get_vocab": lambda self: other_vocab, "__len__": lambda s: 1})()
    with pytest.raises(ConfigError, match="pav.init_model: .* has another tokenizer"):
        verifier_init(same, other, "policy/dir")
    missing = load_config(PAV_CONFIG, [f"pav.init_model={tmp_path / 'no'}"])
    with pytest.raises(ConfigError, match="pav.init_model: cannot load a tokenizer from"):
        verifier_init(missing, tok, "policy/dir")


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def test_value_model_from_policy_and_round_trip(tiny_policy: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = value_model_from_policy(tiny_policy)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy)
    for name, tensor in policy.model.state_dict().items():  # backbone = the policy's base model
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor)
    ids, mask = _inputs()
    assert torch.equal(model(ids, mask), torch.zeros(2, 6))  # zero-initialised head
    torch.nn.init.normal_(model.value_head.weight)
    model.value_head.bias.data.fill_(0.3)
    model.eval()
    expected = model(ids, mask)  # [B, T]
    assert expected.shape == (2, 6) and expected.dtype == torch.float32

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    out = save_value_model(model, tok, tmp_path / "vm")
    meta = json.loads((out / "value_model.json").read_text())
    assert meta["kind"] == "value_model" and meta["hidden_size"] == 32
    loaded, loaded_tok = load_value_model(out)
    assert isinstance(loaded, ValueModel) and not loaded.training
    assert loaded_tok.get_vocab() == tok.get_vocab()
    torch.testing.assert_close(loaded(ids, mask), expected)


class FixedBackbone(nn.Module):
    """A backbone whose last hidden state is `hidden` `[B, T, H]` (in its dtype)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = nn.Parameter(hidden, requires_grad=False)
        self.config = type("Config", (), {"hidden_size": hidden.shape[-1]})()

    def forward(self, **kwargs: Any) -> Any:
        return type("Out", (), {"last_hidden_state": self.hidden})()


def test_bf16_value_model_values_are_not_rounded_to_bf16() -> None:
    """A bf16 value model (critic, PAV verifier) computes its head in float32: 0.5 + 2**-9
    (between two bf16 neighbours near 0.5, 2**-8 apart) comes out exactly, not as 0.5."""
    hidden = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]])  # [B=1, T=2, H=2]
    model = ValueModel(FixedBackbone(hidden)).to(torch.bfloat16)
    with torch.no_grad():
        model.value_head.weight.copy_(torch.tensor([[0.5, 2.0**-9]]))  # exact in bf16
        model.value_head.bias.zero_()
    assert model.value_head.weight.dtype == torch.bfloat16  # storage stays in the run's dtype
    ids = torch.zeros(1, 2, dtype=torch.long)
    values = model(ids, torch.ones_like(ids))
    assert values.dtype == torch.float32
    assert values.tolist() == [[0.5 + 2.0**-9, 0.5 - 2.0**-9]]


def test_save_into_existing_dir_keeps_other_files(tiny_policy: Path, tmp_path: Path) -> None:
    out = tmp_path / "vm"
    model = value_model_from_policy(tiny_policy)
    save_value_model(model, None, out)
    (out / "mc_data.rank0.jsonl").write_text("{}\n")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["value_head.bias"] = torch.tensor([2.0])  # written from a (gathered) state dict
    save_value_model(model, None, out, state_dict=state)
    assert (out / "mc_data.rank0.jsonl").read_text() == "{}\n"
    assert not list(tmp_path.glob(".vm.tmp-*"))  # the temp dir is gone
    loaded, _ = load_value_model_no_tokenizer(out, tiny_policy)
    ids, mask = _inputs()
    torch.testing.assert_close(loaded(ids, mask), torch.full((2, 6), 2.0))


def load_value_model_no_tokenizer(out: Path, policy: Path) -> tuple[Any, Any]:
    """A dir saved without a tokenizer: copy the policy's tokenizer in, then load."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return load_value_model(out)


def test_load_errors_name_the_path(tiny_policy: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"value model {missing} does not exist"):
        load_value_model(missing)
    with pytest.raises(ConfigError, match=f"{tiny_policy} is not a value model: no {HEAD_FILE}"):
        load_value_model(tiny_policy)
    with pytest.raises(ConfigError, match=f"{missing} does not exist"):
        pav.PAVHead(path=str(missing))
    with pytest.raises(ConfigError, match=f"no {HEAD_FILE} in {tiny_policy}"):
        pav.PAVHead(path=str(tiny_policy))


# ----------------------------------------------------------------------------------------------
# PAVHead on a stub verifier
# ----------------------------------------------------------------------------------------------


class StubVerifier(nn.Module):
    """Q^pi = token id / 10 at every position (logit of it; ids 0 and >= 10 clamped)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None):
        self.calls += 1
        return torch.logit((input_ids.float() / 10).clamp(1e-3, 1 - 1e-3))  # [b, T]


class VocabTokenizer:
    def get_vocab(self) -> dict[str, int]:
        return {"a": 0}


def head_batch() -> HeadBatch:
    # B=2, Tp=2, Tr=4. Row 0: prompt [pad, 5], response [3, 7 | 2, 8] (2 steps);
    # row 1: prompt [4, 6], response [9, 1] (1 step), then padding.
    input_ids = torch.tensor([[0, 5, 3, 7, 2, 8], [4, 6, 9, 1, 0, 0]])
    response_mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    attention_mask = torch.cat([torch.tensor([[0, 1], [1, 1]]), response_mask.long()], dim=1)
    return HeadBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        prompt_length=2,
        step_id=torch.tensor([[0, 0, 1, 1], [0, 0, -1, -1]]),
        step_end=torch.tensor([[0.0, 1, 0, 1], [0, 1, 0, 0]]),
        completions=["37\n28", "91"],
        group_size=2,
        prompts=["p", "p"],
        columns={"answer": ["1", "1"]},
    )


def test_pav_head_scores_prover_advantages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / HEAD_FILE).touch()  # passes the constructor's check; loading is stubbed
    stub = StubVerifier()
    monkeypatch.setattr(pav, "load_value_model", lambda path, dtype, ds: (stub, VocabTokenizer()))
    head = pav.PAVHead(path=str(tmp_path), prover_k=2)
    ctx = HeadContext(
        cfg=None,
        dist=DistInfo(0, 1, 0),
        tokenizer=VocabTokenizer(),
        policy_path="",
        ds_config={"zero_optimization": {"stage": 2}},
        micro_batch_size=1,
        local_batch_size=2,
    )
    head.setup(ctx)
    out = checked_score(head, head_batch())
    assert stub.calls == 2  # micro-batches of ctx.micro_batch_size rows
    assert not stub.anchor.requires_grad  # frozen

    def mu(q: float) -> float:  # Best-of-2 prover value
        return 1 - (1 - q) ** 2

    # row 0: Q^pi 0.5 (prompt token 5) -> 0.7 (step 1 ends on 7) -> 0.8 (step 2 ends on 8)
    # row 1: Q^pi 0.6 (prompt token 6) -> 0.1 (step 1 ends on 1)
    a00, a01, a10 = mu(0.7) - mu(0.5), mu(0.8) - mu(0.7), mu(0.1) - mu(0.6)
    expected = torch.tensor([[0.0, a00, 0.0, a01], [0.0, a10, 0.0, 0.0]])
    torch.testing.assert_close(out.token_rewards, expected)
    assert out.metrics["q_prompt"] == pytest.approx(0.55)
    assert out.metrics["q_last_step"] == pytest.approx(0.45)
    assert out.metrics["step_adv"] == pytest.approx((a00 + a01 + a10) / 3)
    expected_q = torch.tensor([[0.0, 0.7, 0.0, 0.8], [0.0, 0.1, 0.0, 0.0]])
    torch.testing.assert_close(head.step_values(head_batch()), expected_q)
    assert head.update(head_batch(), torch.ones(2)) == {} and head.state_dict() == {}


def test_pav_head_reads_the_host_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PAV head's verifier outputs stay on the device over its micro-batches, and its
    metrics are read in one go: the host reads of a score do not grow with the number of
    micro-batches."""
    from tests.host_reads import counted_host_reads

    (tmp_path / HEAD_FILE).touch()
    monkeypatch.setattr(pav, "load_value_model", lambda path, dtype, ds: (StubVerifier(), None))
    counts, outputs = [], []
    for micro_batch_size in (2, 1):
        head = pav.PAVHead(path=str(tmp_path), prover_k=2)
        head.setup(HeadContext(None, DistInfo(0, 1, 0), None, "", {}, micro_batch_size, 2))
        batch = head_batch()
        with counted_host_reads() as reads:
            outputs.append(head.score(batch))
        counts.append(len(reads))
    assert counts[0] == counts[1], counts
    torch.testing.assert_close(outputs[0].token_rewards, outputs[1].token_rewards)
    assert outputs[0].metrics == outputs[1].metrics


def test_row_prefixes_read_the_host_once_per_batch() -> None:
    """`row_prefixes` (pav_mc_oracle) and the trainer's step cutting read each tensor of the
    batch once, not once per row."""
    from rl.rollout.steps import batch_steps
    from tests.host_reads import counted_host_reads

    tok = sm.build_tokenizer()
    small = head_batch()
    large = small.select([0, 1, 0, 1, 1])
    counts = {"prefixes": [], "steps": []}
    for batch in (small, large):
        with counted_host_reads() as reads:
            pav.row_prefixes(batch, tok)
        counts["prefixes"].append(len(reads))
        with counted_host_reads() as reads:
            batch_steps(tok, batch, "\n")
        counts["steps"].append(len(reads))
    assert all(c[0] == c[1] for c in counts.values()), counts


def test_with_terminal_outcome_hand_example() -> None:
    # row 0: 2 steps, row 1: 1 step, row 2: no step (unchanged)
    q_pi = torch.tensor([[0.5, 0.7, 0.8], [0.6, 0.1, 0.0], [0.3, 0.0, 0.0]])
    step_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    anchored = pav.with_terminal_outcome(q_pi, step_mask, torch.tensor([0.0, 1.0, 1.0]))
    expected = torch.tensor([[0.5, 0.7, 0.0], [0.6, 1.0, 0.0], [0.3, 0.0, 0.0]])
    torch.testing.assert_close(anchored, expected)
    assert q_pi[0, 2] == 0.8  # the input is not changed


def test_pav_head_terminal_outcome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / HEAD_FILE).touch()
    monkeypatch.setattr(
        pav, "load_value_model", lambda path, dtype, ds: (StubVerifier(), VocabTokenizer())
    )
    seen: list[list[str]] = []

    def outcome_verifier(prompts: list[str], completions: list[str], columns: Any) -> torch.Tensor:
        seen.append(completions)
        return torch.tensor([0.0, 1.0])  # row 0 wrong, row 1 right

    ctx = HeadContext(None, DistInfo(0, 1, 0), VocabTokenizer(), "", {}, 2, 2)
    head = pav.PAVHead(path=str(tmp_path), prover_k=2, terminal="outcome")
    head.setup(HeadContext(**{**vars(ctx), "verifier": outcome_verifier}))
    out = checked_score(head, head_batch())
    assert seen == [["37\n28", "91"]]

    def mu(q: float) -> float:
        return 1 - (1 - q) ** 2

    # as in test_pav_head_scores_prover_advantages, but Q^pi after the last step is the
    # outcome: row 0 0.5 -> 0.7 -> 0 (not 0.8), row 1 0.6 -> 1 (not 0.1)
    a00, a01, a10 = mu(0.7) - mu(0.5), mu(0.0) - mu(0.7), mu(1.0) - mu(0.6)
    expected = torch.tensor([[0.0, a00, 0.0, a01], [0.0, a10, 0.0, 0.0]])
    torch.testing.assert_close(out.token_rewards, expected)
    assert out.metrics["q_last_step"] == pytest.approx(0.5)
    # each row's step advantages sum to Q^mu(outcome) - Q^mu(s_0)
    sums = out.token_rewards.sum(dim=1)
    torch.testing.assert_close(sums, torch.tensor([mu(0.0) - mu(0.5), mu(1.0) - mu(0.6)]))
    expected_q = torch.tensor([[0.0, 0.7, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(head.step_values(head_batch()), expected_q)


def test_pav_head_terminal_errors_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / HEAD_FILE).touch()
    with pytest.raises(ConfigError, match="terminal must be 'verifier' or 'outcome', got 'end'"):
        pav.PAVHead(path=str(tmp_path), terminal="end")  # type: ignore[arg-type]
    monkeypatch.setattr(
        pav, "load_value_model", lambda path, dtype, ds: (StubVerifier(), VocabTokenizer())
    )
    ctx = HeadContext(None, DistInfo(0, 1, 0), VocabTokenizer(), "", {}, 1, 2)  # no verifier
    with pytest.raises(ConfigError, match="terminal: outcome needs the trainer's outcome verifier"):
        pav.PAVHead(path=str(tmp_path), terminal="outcome").setup(ctx)


def test_pav_head_rejects_another_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / HEAD_FILE).touch()
    monkeypatch.setattr(
        pav, "load_value_model", lambda path, dtype, ds: (StubVerifier(), VocabTokenizer())
    )
    other = type("Other", (), {"get_vocab": lambda self: {"b": 0}})()
    ctx = HeadContext(None, DistInfo(0, 1, 0), other, "", {}, 1, 2)
    with pytest.raises(ConfigError, match=f"verifier at {tmp_path} has another tokenizer"):
        pav.PAVHead(path=str(tmp_path)).setup(ctx)


# ----------------------------------------------------------------------------------------------
# MC oracle: prefixes and labels
# ----------------------------------------------------------------------------------------------


def test_step_prefixes() -> None:
    assert step_prefixes([1, 2], [3, 4, 5, 6, 7], [1, 3, 4]) == [
        [1, 2],
        [1, 2, 3, 4],
        [1, 2, 3, 4, 5, 6],
    ]
    assert step_prefixes([1, 2], [3], [0]) == [[1, 2]]  # one step: only the bare prompt
    assert step_prefixes([1, 2], [], []) == []


def oracle_batch(tok: Any) -> HeadBatch:
    """Row 0: "1+2=3\\nAnswer: 3<eos>" (steps end at 5 and 15); row 1: "Answer: 0<eos>"."""
    prompts = [sm.prompt_text(tok, "1 +2"), sm.prompt_text(tok, "0 *5")]
    p_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    r_ids = [tok(r).input_ids + [tok.eos_token_id] for r in ("1+2=3\nAnswer: 3", "Answer: 0")]
    tp, tr = max(map(len, p_ids)), max(map(len, r_ids))
    ids = torch.full((2, tp + tr), tok.pad_token_id)
    attention = torch.zeros(2, tp + tr, dtype=torch.long)
    response_mask = torch.zeros(2, tr)
    for b in range(2):
        ids[b, tp - len(p_ids[b]) : tp] = torch.tensor(p_ids[b])
        ids[b, tp : tp + len(r_ids[b])] = torch.tensor(r_ids[b])
        attention[b, tp - len(p_ids[b]) : tp + len(r_ids[b])] = 1
        response_mask[b, : len(r_ids[b])] = 1
    step_end = torch.zeros(2, tr)
    step_end[0, [5, 15]] = 1
    step_end[1, 9] = 1
    return HeadBatch(
        input_ids=ids,
        attention_mask=attention,
        response_mask=response_mask,
        prompt_length=tp,
        step_id=torch.zeros(2, tr, dtype=torch.long),  # unused by the oracle
        step_end=step_end,
        completions=["1+2=3\nAnswer: 3", "Answer: 0"],
        group_size=2,
        prompts=prompts,
        columns={"answer": ["3", "0"]},
    )


def test_row_prefixes_hand_example() -> None:
    tok = sm.build_tokenizer()
    batch = oracle_batch(tok)
    prefixes, texts, counts = pav.row_prefixes(batch, tok)
    assert counts == [2, 1]
    decoded = [tok.decode(p) for p in prefixes]
    assert decoded == ["<bos>1 +2\n", "<bos>1 +2\n1+2=3\n", "<bos>0 *5\n"]  # no padding
    assert texts == ["", "1+2=3\n", ""]


def test_success_rates_and_labels() -> None:
    success = torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 1])  # 2 prefixes x 4 continuations
    torch.testing.assert_close(success_rates(success, 4), torch.tensor([0.75, 0.25]))
    with pytest.raises(ValueError):
        success_rates(success, 3)
    assert solution_labels([0.75, 0.25], 1.0) == [0.75, 0.25, 1.0]
    assert solution_labels([], 1.0) == []
    q_pi, step_mask = q_table(torch.tensor([0.75, 0.25, 0.5]), [2, 1], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(q_pi, torch.tensor([[0.75, 0.25, 1.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(step_mask, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))


class FakeRollout:
    """Continuation j of a prefix of L tokens is "ok" for j < L % 4, else "no"."""

    synced_gpus = False

    def __init__(self) -> None:
        self.calls: list[int] = []

    def rollout(self, model, prompt_ids, prompts, columns, sampling, group_size):
        self.calls.append(len(prompt_ids) * group_size)
        completions = [
            "ok" if j < len(ids) % 4 else "no" for ids in prompt_ids for j in range(group_size)
        ]
        rep = {k: [x for x in v for _ in range(group_size)] for k, v in columns.items()}
        return type(
            "Out",
            (),
            {
                "completions": completions,
                "prompts": [p for p in prompts for _ in range(group_size)],
                "columns": rep,
            },
        )()


def test_mc_oracle_head_labels_and_advantages() -> None:
    tok = sm.build_tokenizer()
    batch = oracle_batch(tok)
    seen: list[list[str]] = []

    def verifier(prompts: list[str], completions: list[str], columns: dict) -> torch.Tensor:
        seen.append(completions)
        return torch.tensor([float(c.endswith("ok") or c.endswith(": 3")) for c in completions])

    head = pav.PAVMCOracleHead(n_mc=3, prover_k=1)
    with pytest.raises(ConfigError, match="pav_mc_oracle needs the trainer's policy, rollout"):
        head.setup(HeadContext(None, DistInfo(0, 1, 0), tok, "", {}, 4, 2))
    rollout = FakeRollout()
    head.setup(
        HeadContext(
            None,
            DistInfo(0, 1, 0),
            tok,
            "",
            {},
            4,
            2,
            policy=lambda: None,
            rollout=rollout,
            verifier=verifier,
            sampling=object(),
        )
    )
    q_pi, step_mask = head.q_values(batch)
    assert rollout.calls == [3 * 3]  # 3 prefixes x n_mc, in one call
    # prefixes: row 0 bare (6 tokens: 2 of 3 continuations "ok"), row 0 after "1+2=3\n" (12
    # tokens: none), row 1 bare (6 tokens: 2 of 3); outcomes: row 0 right (1), row 1 wrong (0)
    assert seen[0][:6] == ["ok", "ok", "no", "1+2=3\nno", "1+2=3\nno", "1+2=3\nno"]
    p0, p1 = 2 / 3, 0.0
    torch.testing.assert_close(q_pi, torch.tensor([[p0, p1, 1.0], [p0, 0.0, 0.0]]))
    torch.testing.assert_close(step_mask, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    out = checked_score(head, batch)  # prover_k=1: A = Q^pi differences
    assert out.token_rewards[0, 5] == pytest.approx(p1 - p0)
    assert out.token_rewards[0, 15] == pytest.approx(1.0 - p1)
    assert out.token_rewards[1, 9] == pytest.approx(0.0 - p0)
    assert int((out.token_rewards != 0).sum()) <= 3
    values = head.step_values(batch)
    assert values[0, 15] == 1.0 and values[1, 9] == 0.0


# ----------------------------------------------------------------------------------------------
# MC records and verifier training data
# ----------------------------------------------------------------------------------------------


def record(prompt: int, sample: int, labels: list[float] | None = None) -> SolutionRecord:
    return SolutionRecord(
        prompt_index=prompt,
        sample=sample,
        prompt_ids=[1, 5],
        response_ids=[7, 3, 8, 2],
        step_ends=[1, 3],
        labels=[0.5, 0.25, 1.0] if labels is None else labels,
        completion="x",
    )


class TinyVerifierEngine(nn.Module):
    """A value model (embedding -> scalar per position, no host reads) behind the engine
    calls `train_epoch` and `evaluate` make."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 1)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids).squeeze(-1) * attention_mask  # [b, T]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


@pytest.mark.parametrize("fit", ["train_epoch", "evaluate"])
def test_verifier_fitting_reads_the_host_once_per_pass(fit: str) -> None:
    """`train_epoch` and `evaluate` keep their sums on the device: the host reads of a pass
    do not grow with its number of micro-batches (each would wait for the GPU)."""
    from rl.pav.fitting import evaluate, train_epoch
    from tests.host_reads import counted_host_reads

    counts = []
    for n_records in (2, 8):  # 1 and 4 micro-batches of 2
        records = [record(p, 0, [0.5, 0.25, 1.0]) for p in range(n_records)]
        engine = TinyVerifierEngine()
        with counted_host_reads() as reads:
            if fit == "train_epoch":
                train_epoch(engine, records, list(range(n_records)), DistInfo(0, 1, 0), 2, 0)
            else:
                evaluate(engine, records, DistInfo(0, 1, 0), 2, 0)
        counts.append(len(reads))
    assert counts[0] == counts[1] <= 2, counts


def test_records_resume_after_a_partial_write(tmp_path: Path) -> None:
    path = tmp_path / "mc_data.rank0.jsonl"
    append_records(path, [record(0, 0), record(0, 1), record(1, 0)])
    with open(path, "a") as f:
        f.write('{"prompt_index": 1, "sam')  # killed mid-line
    assert complete_prompts(read_records([path]), 2) == {0}  # prompt 1 lacks sample 1
    append_records(path, [record(1, 0, [0.0, 0.0, 0.0]), record(1, 1)])
    records = read_records([path])
    assert complete_prompts(records, 2) == {0, 1}
    assert len(records) == 4  # the rerun's (1, 0) replaced the old one
    assert [r.labels for r in records if (r.prompt_index, r.sample) == (1, 0)] == [[0.0] * 3]


def test_collate_label_positions() -> None:
    short = SolutionRecord(0, 0, [4], [6, 2], [1], [0.5, 1.0], "y")
    batch = collate([record(0, 0), short], pad_id=0)
    # Tp = 2, Tr = 4. Row 0 labels at 1 (prompt), 2 + 1, 2 + 3; row 1 (left-padded prompt) at
    # 1 and 2 + 1.
    torch.testing.assert_close(
        batch.input_ids, torch.tensor([[1, 5, 7, 3, 8, 2], [0, 4, 6, 2, 0, 0]])
    )
    torch.testing.assert_close(batch.attention_mask, (batch.input_ids != 0).long())
    torch.testing.assert_close(
        batch.label_mask, torch.tensor([[0.0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 0]])
    )
    torch.testing.assert_close(
        batch.labels, torch.tensor([[0.0, 0.5, 0, 0.25, 0, 1.0], [0, 0.5, 0, 1.0, 0, 0]])
    )


def test_plan_micro_batches_equal_on_every_rank() -> None:
    order = [4, 0, 3, 1, 2]
    plans = [plan_micro_batches(order, 2, rank, 2) for rank in range(2)]
    assert [len(p) for p in plans] == [2, 2]  # ceil(5 / (2 x 2)) steps on both ranks
    assert plans[0] == [([4, 0], [True, True]), ([2, 4], [True, False])]
    assert plans[1] == [([3, 1], [True, True]), ([0, 3], [False, False])]
    assert plan_micro_batches([], 2, 0, 2) == []


def test_split_by_prompt_keeps_solutions_together() -> None:
    records = [record(p, s) for p in range(10) for s in range(2)] + [record(10, 0, [])]
    train, val = split_by_prompt(records, 0.2, seed=0)
    val_prompts = {r.prompt_index for r in val}
    assert len(val_prompts) == 2 and len(val) == 4
    assert not val_prompts & {r.prompt_index for r in train}
    assert all(r.labels for r in train + val)  # the solution without steps is dropped
    assert split_by_prompt(records, 0.2, seed=0) == (train, val)  # deterministic


# ----------------------------------------------------------------------------------------------
# Which epoch's verifier is saved (`pav.keep`)
# ----------------------------------------------------------------------------------------------


def test_is_better_compares_validation_bce() -> None:
    assert is_better({"val_bce": 0.7}, None)  # the first epoch
    assert is_better({"val_bce": 0.6}, 0.7)
    assert not is_better({"val_bce": 0.7}, 0.7)  # a tie keeps the earlier epoch
    assert not is_better({"val_bce": 0.8}, 0.7)
    assert is_better({"train_bce": 0.9}, 0.7)  # no validation set: the latest epoch


def test_cpu_copy_is_not_changed_by_later_steps() -> None:
    live = {"w": torch.ones(3)}
    kept = cpu_copy(live)
    live["w"].add_(1.0)  # an optimizer step on the live parameter
    assert kept is not None and kept["w"].tolist() == [1.0, 1.0, 1.0]
    assert cpu_copy(None) is None  # ranks other than 0 hold no gathered weights


def test_kept_row_reads_the_saved_epoch() -> None:
    epochs = [{"epoch": 1, "val_bce": 0.6}, {"epoch": 2, "val_bce": 0.7}]
    assert kept_row({"epochs": epochs, "kept_epoch": 1}) == epochs[0]
    assert kept_row({"epochs": epochs}) == epochs[1]  # older files kept the last epoch
    assert kept_row({"epochs": [], "kept_epoch": 0}) == {}


def test_bad_keep_rule_names_the_key() -> None:
    cfg = load_config(PAV_CONFIG, ["pav.keep=first"])
    with pytest.raises(ConfigError, match="pav.keep: 'first' is not one of best, last"):
        check_pav_config(cfg)


class ScriptedFit:
    """Stands in for the verifier's engine and fitting on one rank: epoch e sets the single
    weight to e and reports the scripted validation BCE of that epoch."""

    def __init__(self, val_bces: list[float]) -> None:
        self.val_bces = val_bces
        self.weight = torch.zeros(1)
        self.epoch = 0

    def train_epoch(self, *args: Any, **kwargs: Any) -> float:
        self.epoch += 1
        self.weight.fill_(float(self.epoch))  # in place, like an optimizer step
        return 1.0

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        return {"bce": self.val_bces[self.epoch - 1], "acc": 0.5}

    def full_state_dict(self, engine: Any) -> dict[str, torch.Tensor]:
        return {"w": self.weight}  # the live tensor, as on a CPU run without ZeRO-3


@pytest.mark.parametrize(
    ("keep", "val_bces", "with_val", "want_epoch"),
    [
        ("best", [0.5, 0.3, 0.4], True, 2),  # an earlier epoch
        ("best", [0.5, 0.4, 0.3], True, 3),  # the last one
        ("best", [0.3, 0.3, 0.3], True, 1),  # ties keep the earliest
        ("last", [0.5, 0.3, 0.4], True, 3),
        ("best", [0.5, 0.3, 0.4], False, 3),  # nothing held out: the last
    ],
)
def test_train_verifier_saves_the_kept_epochs_weights(
    monkeypatch: pytest.MonkeyPatch,
    keep: str,
    val_bces: list[float],
    with_val: bool,
    want_epoch: int,
) -> None:
    import rl.engine.value_model as value_model

    fit = ScriptedFit(val_bces)
    monkeypatch.setattr(
        value_model, "value_model_from_policy", lambda path, dtype, ds: nn.Linear(1, 1)
    )
    monkeypatch.setattr(pav_train, "make_value_engine", lambda cfg, dist, model, ds: object())
    monkeypatch.setattr(pav_train, "train_epoch", fit.train_epoch)
    monkeypatch.setattr(pav_train, "evaluate", fit.evaluate)
    monkeypatch.setattr(pav_train.eng, "full_state_dict", fit.full_state_dict)
    cfg = load_config(
        PAV_CONFIG, [f"pav.keep={keep}", "pav.epochs=3", "logging.progress_bar=false"]
    )
    train = [record(p, 0) for p in range(4)]
    val = [record(9, 0)] if with_val else []
    run = pav_train.train_verifier(cfg, DistInfo(0, 1, 0), "unused", train, val, pad_id=0)
    assert len(run.history) == 3
    assert run.kept_epoch == want_epoch
    assert run.kept_state is not None
    assert run.kept_state["w"].tolist() == [float(want_epoch)]  # that epoch's weights


def test_pipeline_puts_the_engine_to_sleep_before_training_the_verifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rl.pav.train.run`: once the data is collected the rollout engine sleeps (vLLM sleep
    mode frees its weights and KV cache), so the verifier trains without its memory."""
    import rl.engine.models as models
    import rl.engine.value_model as value_model

    calls: list[str] = []

    class RecordingRollout:
        def prepare_for_update(self) -> None:
            calls.append("sleep")

        def close(self) -> None:
            calls.append("close")

    def collect(*args: Any) -> Any:
        calls.append("collect")
        return RecordingRollout(), [record(0, 0)], [], 3, None

    def train(*args: Any, **kwargs: Any) -> Any:
        calls.append("train")
        engine = type("Engine", (), {"module": None})()
        return pav_train.VerifierRun(engine, [{"epoch": 1, "train_bce": 0.5}], 1, None)

    tok = type("Tok", (), {"pad_token_id": 0})()
    monkeypatch.setattr(models, "load_policy", lambda cfg, dist: (object(), tok, "policy"))
    monkeypatch.setattr(pav_train, "verifier_init", lambda cfg, tok, path: path)
    monkeypatch.setattr(pav_train, "select_prompts", lambda cfg, tok: [])
    monkeypatch.setattr(pav_train, "collect_records", collect)
    monkeypatch.setattr(pav_train, "train_verifier", train)
    monkeypatch.setattr(value_model, "save_value_model", lambda *args, **kwargs: None)
    cfg = load_config(PAV_CONFIG, [f"pav.output_dir={tmp_path}"])
    pav_train.run(cfg, DistInfo(0, 1, 0))
    assert calls == ["collect", "sleep", "train", "close"]
