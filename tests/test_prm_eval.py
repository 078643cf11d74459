"""ProcessBench-style PRM evaluation: scores, predictions, labelled data, head batches, launcher."""

from __future__ import annotations

import json
import math
import string
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from rewards.heads import Granularity, HeadBatch, HeadOutput, StatelessHead
from rl.core.errors import DataError, RewardError
from rl.engine.start_model import build_tokenizer
from rl.eval import prm as prm_eval
from rl.rollout.steps import response_step_spans
from rl.tasks import arith
from tests.heads import ArithOraclePRM, ArithOracleRewardPRM
from tests.launcher import REPO, run_env

# --------------------------------------------------------------------------------------------
# Scores and predictions
# --------------------------------------------------------------------------------------------


def test_f1_perfect_predictions() -> None:
    s = prm_eval.processbench_scores([-1, 2, 0, -1], [-1, 2, 0, -1])
    assert (s["acc_error"], s["acc_correct"], s["f1"]) == (1.0, 1.0, 1.0)
    assert (s["n"], s["n_error"], s["n_correct"]) == (4, 2, 2)


def test_f1_all_predictions_wrong() -> None:
    s = prm_eval.processbench_scores([0, 1, -1, 1], [-1, 2, 0, -1])
    assert (s["acc_error"], s["acc_correct"], s["f1"]) == (0.0, 0.0, 0.0)
    assert (s["error_early"], s["error_late"], s["error_missed"]) == (1, 0, 1)


def test_f1_hand_computed_mix() -> None:
    # right: 1 of 2 predicted -1; wrong: 1 of 3 exact (2), one late (1 > 0), one missed
    s = prm_eval.processbench_scores([-1, 0, 2, 1, -1], [-1, -1, 2, 0, 1])
    assert s["acc_correct"] == 0.5
    assert s["acc_error"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))  # 0.4
    assert s["f1"] == pytest.approx(0.4)
    assert (s["hits_error"], s["hits_correct"]) == (1, 1)
    assert (s["error_early"], s["error_late"], s["error_missed"]) == (0, 1, 1)


def test_f1_is_zero_when_one_accuracy_is_zero() -> None:
    s = prm_eval.processbench_scores([-1, -1], [-1, 1])
    assert (s["acc_error"], s["acc_correct"], s["f1"]) == (0.0, 1.0, 0.0)


def test_f1_undefined_without_one_kind_of_solution() -> None:
    s = prm_eval.processbench_scores([-1, 0], [-1, -1])
    assert s["acc_correct"] == 0.5
    assert s["acc_error"] is None and s["f1"] is None


def test_f1_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        prm_eval.processbench_scores([-1, 0, 1], [-1, 0])


def test_trivial_baselines() -> None:
    b = prm_eval.trivial_baselines([-1, 0, 2, -1])
    assert b["always_no_error"]["f1"] == 0.0
    assert b["always_no_error"]["acc_correct"] == 1.0
    assert b["always_step_0"]["acc_error"] == 0.5
    assert b["always_step_0"]["f1"] == 0.0


@pytest.mark.parametrize(
    ("values", "threshold", "expected"),
    [
        ([0.9, 0.6, 0.4, 0.1], 0.5, 2),
        ([0.9, 0.6, 0.4, 0.1], 0.7, 1),
        ([0.9, 0.6, 0.4, 0.1], 0.95, 0),
        ([0.9, 0.6, 0.4, 0.1], 0.05, -1),
        ([0.9, 0.2, 0.8], 0.5, 1),  # the first one below, even if a later one recovers
        ([0.5, 0.5], 0.5, -1),  # at the threshold is not below it
        ([], 0.5, -1),
    ],
)
def test_first_error_from_step_values(values: list[float], threshold: float, expected: int):
    assert prm_eval.first_error_from_step_values(values, threshold) == expected
    assert prm_eval.first_error_from_step_values(torch.tensor(values), threshold) == expected


def test_first_error_rejects_nan() -> None:
    with pytest.raises(ValueError, match="step value 1 is nan"):
        prm_eval.first_error_from_step_values([0.9, math.nan], 0.5)


# A weak policy's value model: every value is below 0.5, the error shows as a drop.
WEAK_VALUES = [[0.3, 0.1, 0.05], [0.3, 0.25, 0.2], [0.2, 0.04]]
WEAK_LABELS = [1, -1, 1]


def test_fixed_threshold_flags_step_0_of_a_weak_policys_values() -> None:
    result = prm_eval.score_step_values(WEAK_VALUES, WEAK_LABELS, 0.5)
    assert result["predictions"] == [0, 0, 0]
    assert result["scores"]["f1"] == 0.0  # no wrong solution's step 0, no right one kept


def test_best_threshold_hand_computed() -> None:
    # F1 = 1 needs solutions 0 and 2 flagged at step 1 (0.1 < t <= 0.3, 0.04 < t <= 0.2)
    # and solution 1 never flagged (t <= 0.2): the first grid value in (0.1, 0.2] is 0.11
    assert prm_eval.best_threshold(WEAK_VALUES, WEAK_LABELS) == (0.11, 1.0)
    assert prm_eval.score_step_values(WEAK_VALUES, WEAK_LABELS, 0.11)["predictions"] == [1, -1, 1]
    # at 0.1: solution 0 is missed (0.1 is not below 0.1), so acc_error 1/2, acc_correct 1
    assert prm_eval.best_threshold(WEAK_VALUES, WEAK_LABELS, [0.1]) == (0.1, pytest.approx(2 / 3))
    # ties go to the earliest candidate
    assert prm_eval.best_threshold(WEAK_VALUES, WEAK_LABELS, [0.5, 0.2, 0.15]) == (0.2, 1.0)
    with pytest.raises(ValueError, match="no candidate"):
        prm_eval.best_threshold(WEAK_VALUES, WEAK_LABELS, [])


# --------------------------------------------------------------------------------------------
# Labelled data
# --------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"problem": "1 +1", "steps": ["1+1=2", "Answer: 2"], "label": -1, "id": "a"}


def test_load_processbench_jsonl(tmp_path: Path) -> None:
    row2 = {**GOOD, "label": 1, "id": "b"}
    path = write_lines(tmp_path / "pb.jsonl", [json.dumps(GOOD), "", json.dumps(row2)])
    rows = prm_eval.load_processbench_jsonl(path)
    assert [r["label"] for r in rows] == [-1, 1]
    assert rows[1]["id"] == "b"  # extra keys are kept (passed on as columns)
    assert len(prm_eval.load_processbench_jsonl(path, n=1)) == 1


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"problem": "p", "label": -1}), "missing key 'steps'"),
        (json.dumps({**GOOD, "steps": "1+1=2"}), "'steps' must be a list of strings"),
        (json.dumps({**GOOD, "steps": ["1+1=2", 3]}), "'steps' must be a list of strings"),
        (json.dumps({**GOOD, "steps": []}), "'steps' is empty"),
        (json.dumps({**GOOD, "label": 2}), "'label' must be an integer in -1..1"),
        (json.dumps({**GOOD, "label": -2}), "'label' must be an integer in -1..1"),
        (json.dumps({**GOOD, "label": "1"}), "'label' must be an integer"),
        (json.dumps({**GOOD, "label": True}), "'label' must be an integer"),
        (json.dumps({**GOOD, "problem": 3}), "'problem' must be a string"),
    ],
)
def test_load_processbench_jsonl_errors_name_file_and_line(
    tmp_path: Path, bad_line: str, message: str
) -> None:
    path = write_lines(tmp_path / "pb.jsonl", [json.dumps(GOOD), "", bad_line])
    with pytest.raises(DataError) as err:
        prm_eval.load_processbench_jsonl(path)
    assert str(err.value).startswith(f"{path} line 3: ")
    assert message in str(err.value)


def test_load_processbench_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        prm_eval.load_processbench_jsonl(tmp_path / "nope.jsonl")


def test_builtin_labels_match_first_error_step() -> None:
    task = {"n_steps": 4, "modulus": 11, "operand_max": 9}
    rows = prm_eval.builtin_labelled_solutions(task, "eval", 200, seed=3)
    assert len(rows) == 200
    labels = [r["label"] for r in rows]
    assert labels.count(-1) == 100
    # every line can be the first error, the answer line (index n_steps) included
    assert set(labels) == {-1, 0, 1, 2, 3, 4}
    for r in rows:
        assert len(r["steps"]) == 5
        problem = arith.parse_prompt(r["problem"], 11)
        completion = "\n".join(r["steps"])
        assert arith.first_error_step(problem, completion) == r["label"]
        assert r["answer"] == str(problem.answer)
        if r["label"] == -1:
            assert r["steps"] == arith.step_lines(problem)
        # later lines continue consistently from the (possibly wrong) value they follow
        for prev, line in zip(r["steps"][:-2], r["steps"][1:-1], strict=True):
            assert line.startswith(prev.split("=")[1])
        assert arith.split_of(r["problem"]) == "eval"
    again = prm_eval.builtin_labelled_solutions(task, "eval", 200, seed=3)
    assert again == rows


# --------------------------------------------------------------------------------------------
# Head batches and step mapping
# --------------------------------------------------------------------------------------------


def merging_tokenizer(merges: list[tuple[str, str]]) -> Any:
    """The builtin character tokenizer plus BPE merges (tokens across characters)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    tokens = ["<pad>", "<bos>", "<eos>", *chars, *(a + b for a, b in merges)]
    core = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None)
    )
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def test_head_batch_step_mapping_with_the_builtin_tokenizer() -> None:
    tok = build_tokenizer()
    rows: list[dict[str, Any]] = [
        {"problem": "3 +4", "steps": ["3+4=0", "Answer: 0"], "label": -1, "answer": "0"},
        {"problem": "3 +4 *2 -6", "steps": ["3+4=0", "0*2=0", "0-6=1", "Answer: 1"], "label": -1},
    ]
    batch = prm_eval.build_head_batch(rows, tok, first_index=0)
    assert batch.prompts == ["<bos>3 +4\n", "<bos>3 +4 *2 -6\n"]
    assert batch.prompt_length == 1 + len("3 +4 *2 -6\n")  # <bos> is one token
    assert batch.attention_mask[0, :6].tolist() == [0] * 6  # left padding of the short prompt
    assert batch.columns == {"prompt": ["3 +4", "3 +4 *2 -6"]}  # `answer` is not in every row
    assert batch.group_size == 1
    response = batch.input_ids[:, batch.prompt_length :]
    for b, row in enumerate(rows):
        n = len("\n".join(row["steps"])) + 1  # characters + EOS
        assert batch.response_mask[b].sum().item() == n
        assert response[b, n - 1].item() == tok.eos_token_id
        assert batch.step_end[b].sum().item() == len(row["steps"])
        assert batch.step_end[b, n - 1].item() == 1.0  # EOS closes the last step
        for h, step in enumerate(row["steps"]):
            ids = response[b][batch.step_id[b] == h].tolist()
            assert str(tok.decode(ids, skip_special_tokens=True)).strip() == step
        assert (batch.step_id[b, n:] == -1).all()


def test_head_batch_with_merged_tokens() -> None:
    # "1\n" (a step's end with the delimiter) and "\nA" (the delimiter with the next step's
    # start) are single tokens: both map to the right steps
    tok = merging_tokenizer([("1", "\n"), ("\n", "A")])
    rows = [{"problem": "3 +5", "steps": ["3+5=1", "Answer: 1"], "label": -1}]
    batch = prm_eval.build_head_batch(rows, tok)
    response = batch.input_ids[0, batch.prompt_length :]
    assert tok.convert_ids_to_tokens(response.tolist())[4:6] == ["1\n", "A"]
    assert batch.step_id[0].tolist()[:6] == [0, 0, 0, 0, 0, 1]


class SlowView:
    """A tokenizer seen as a slow one (no offset mapping): spans from incremental decoding."""

    is_fast = False

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eos_token_id = tok.eos_token_id

    def __call__(self, text: str, **kwargs: Any) -> Any:
        assert "return_offsets_mapping" not in kwargs
        return self.tok(text, **kwargs)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self.tok.decode(ids, **kwargs))


@pytest.mark.parametrize("merges", [[], [("1", "\n"), ("\n", "A"), ("=", "1")]])
def test_spans_are_the_trainers(merges: list[tuple[str, str]]) -> None:
    """Offset-mapping spans = incremental-decoding spans = `rl.rollout.steps.response_step_spans`
    (what the trainer computes from the same ids)."""
    tok = merging_tokenizer(merges)
    steps = ["3+5=1", "1*2=2", "Answer: 1"]
    ids, spans = prm_eval.response_ids_and_spans(tok, steps, "\n")
    assert prm_eval.response_ids_and_spans(SlowView(tok), steps, "\n") == (ids, spans)
    assert spans == response_step_spans(tok, ids, "\n")
    assert len(spans) == 3 and spans[-1][1] == len(ids) - 1  # EOS ends the last step


def test_head_batch_rejects_a_token_across_steps() -> None:
    tok = merging_tokenizer([("1", "\n"), ("1\n", "2")])
    rows = [
        {"problem": "3 +5", "steps": ["3+5=1", "Answer: 1"], "label": -1},
        {"problem": "3 +5 +1", "steps": ["3+5=1", "1+1=2"], "label": -1},
        {"problem": "3 +5 +1", "steps": ["3+5=1", "2"], "label": -1},
    ]
    prm_eval.build_head_batch(rows[:2], tok)
    with pytest.raises(DataError, match="eval data row 7: the response's tokens split"):
        prm_eval.build_head_batch(rows, tok, first_index=5)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (["3+4=0\n0*2=0", "Answer: 0"], "step 0 contains the step delimiter '\\\\n'"),
        (["3+4=0", "  ", "Answer: 0"], "step 1 is empty or blank"),
    ],
)
def test_head_batch_rejects_bad_steps(steps: list[str], message: str) -> None:
    rows = [{"problem": "3 +4", "steps": steps, "label": -1}]
    with pytest.raises(DataError, match=f"file.jsonl row 0: {message}"):
        prm_eval.build_head_batch(rows, build_tokenizer(), source="file.jsonl")


# --------------------------------------------------------------------------------------------
# Scoring heads
# --------------------------------------------------------------------------------------------


class FixedRewards(StatelessHead):
    """Token rewards given per row (no `step_values`)."""

    name = "fixed"
    granularity: Granularity = "token"

    def __init__(self, rewards: Tensor) -> None:
        self.rewards = rewards

    def score(self, batch: HeadBatch) -> HeadOutput:
        return HeadOutput(token_rewards=self.rewards[:, : batch.response_length].clone())


def test_values_from_rewards_are_sigmoid_of_cumulative_sums() -> None:
    tok = build_tokenizer()
    rows = [{"problem": "3 +4", "steps": ["3+4=0", "Answer: 0"], "label": -1}]
    batch = prm_eval.build_head_batch(rows, tok)  # 6 + 9 + EOS = 16 tokens, steps end at 5, 15
    rewards = torch.zeros(1, 16)
    rewards[0, 0] = 0.5
    rewards[0, 5] = 1.0
    rewards[0, 9] = -2.5
    rewards[0, 15] = 0.25
    values, mask = prm_eval.head_step_values(FixedRewards(rewards), batch)
    expected = torch.sigmoid(torch.tensor([[1.5, -0.75]]))
    assert torch.allclose(values, expected) and mask.tolist() == [[1.0, 1.0]]
    assert prm_eval.predict_first_errors(FixedRewards(rewards), batch) == [1]


def test_bad_step_values_name_the_head() -> None:
    class Bad(ArithOraclePRM):
        def step_values(self, batch: HeadBatch) -> Tensor:
            return super().step_values(batch) * 2

    rows = prm_eval.builtin_labelled_solutions({}, "eval", 4, seed=0)
    with pytest.raises(RewardError, match="'arith_oracle_prm': step_values must be prob"):
        prm_eval.evaluate_head(Bad(), rows, build_tokenizer())


@pytest.mark.parametrize("kind", ["step_values", "step_values_tokens", "score"])
def test_perfect_prm_scores_f1_one(kind: str) -> None:
    tok = build_tokenizer()
    rows = prm_eval.builtin_labelled_solutions({}, "eval", 48, seed=1)
    head: Any = ArithOracleRewardPRM() if kind == "score" else ArithOraclePRM()
    if kind == "step_values_tokens":  # steps checked on their own tokens
        head.setup(SimpleNamespace(tokenizer=tok))
    result = prm_eval.evaluate_head(head, rows, tok, batch_size=10)
    assert result["scores"]["f1"] == 1.0
    assert result["predictions"] == result["labels"] == [r["label"] for r in rows]
    assert result["baselines"]["always_no_error"]["f1"] == 0.0
    table = prm_eval.format_table(result["scores"], result["baselines"])
    assert "always_no_error" in table and " 1.000" in table


# --------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------

EVAL = REPO / "launch" / "eval_prm.py"


def run_eval(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EVAL), "--config", "configs/quickstart.yaml", *args],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_oracle_eval(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """The launcher on 24 built-in solutions with the oracle head: (process, results JSON)."""
    # a tokenizer-only "model" directory: the oracle head needs no weights
    build_tokenizer().save_pretrained(tmp_path / "tok")
    out = tmp_path / "results.json"
    head = ["--head", "tests.heads:ArithOraclePRM", "--head-kwargs", "{modulus: 7}"]
    proc = run_eval(
        [*head, "--n", "24", *flags, "--out", str(out), f"model.path={tmp_path / 'tok'}"]
        + ["logging.progress_bar=false"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_launcher_scores_the_oracle_head(tmp_path: Path) -> None:
    proc, results = run_oracle_eval(tmp_path)
    assert results["head"] == "tests.heads:ArithOraclePRM"
    assert results["head_kwargs"] == {"modulus": 7}
    assert results["scores"]["f1"] == 1.0 and results["scores"]["n"] == 24
    assert results["baselines"]["always_no_error"]["f1"] == 0.0
    assert results["predictions"] == results["labels"]
    assert results["threshold"] == 0.5 and results["threshold_tuning"] is None
    assert "always_step_0" in proc.stdout


def test_launcher_tunes_the_threshold_on_another_split(tmp_path: Path) -> None:
    proc, results = run_oracle_eval(tmp_path, "--tune-threshold-on", "validation")
    # the oracle's values are 0 or 1: every threshold in the grid scores F1 1, the first wins
    assert results["threshold"] == 0.01
    assert results["threshold_tuning"] == {"split": "validation", "n": 24, "f1": 1.0}
    assert results["split"] == "eval" and results["scores"]["f1"] == 1.0
    assert "best F1 1.000 on the validation split" in proc.stdout


def load_eval_prm() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_prm", REPO / "launch" / "eval_prm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tune-threshold-on", "eval"], "--tune-threshold-on eval is the split being scored"),
        (["--tune-threshold-on", "dev"], "--tune-threshold-on: unknown split 'dev'"),
        (["--tune-threshold-on", "validation", "--threshold", "0.3"], "exclude each other"),
        (["--tune-threshold-on", "validation", "--data", "pb.jsonl"], "needs --data builtin"),
    ],
)
def test_bad_threshold_tuning_flags_name_the_flag(flags: list[str], message: str) -> None:
    from rl.core.errors import ConfigError

    module = load_eval_prm()
    args = module.parse_args(["--config", "c.yaml", *flags])
    with pytest.raises(ConfigError, match=message):
        module.check_threshold_args(args)


def test_launcher_bad_data_is_a_one_line_error(tmp_path: Path) -> None:
    data = write_lines(tmp_path / "pb.jsonl", [json.dumps({**GOOD, "label": 5})])
    proc = run_eval(["--head", "tests.heads:ArithOraclePRM", "--data", str(data)])
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {data} line 1: 'label' must be an integer")
    assert "Traceback" not in proc.stderr


def test_launcher_keeps_dotted_overrides() -> None:
    args = load_eval_prm().parse_args(
        ["--config", "c.yaml", "--head", "pav", "model.path=/m", "a.b=1"]
    )
    assert args.head == "pav"
    assert args.overrides == ["model.path=/m", "a.b=1"]
