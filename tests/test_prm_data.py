"""Step-label data (rl/prm/data.py) and labelers (rl/prm/labelers.py): each labeler against
hand-made solutions (Monte-Carlo ones with a fake continuation sampler), both file formats'
round trip, the Math-Shepherd parse, and every bad-input message."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rl.core.errors import ConfigError
from rl.prm.data import (
    StepExample,
    read_step_dataset,
    total_cost,
    write_jsonl,
    write_step_dataset,
)
from rl.prm.labelers import (
    LabelerOptions,
    StepSolution,
    first_error_labels,
    make_labeler,
    record_steps,
    rollout_continuations,
)

# "3 +4 *2 -1" mod 7: 3+4=0, 0*2=0, 0-1=6
PROBLEM = "3 +4 *2 -1"
RIGHT = ["3+4=0", "0*2=0", "0-1=6", "Answer: 6"]


def sol(
    steps: list[str], outcome: float = 0.0, prompt: str = PROBLEM, **extra: Any
) -> StepSolution:
    return StepSolution(prompt=prompt, steps=steps, answer="6", outcome=outcome, extra=extra)


def even_steps_good(prompt: str, steps: list[str], answer: str | None) -> list[bool]:
    """A user labeler: steps 0, 2, 4, ... good."""
    del prompt, answer
    return [i % 2 == 0 for i in range(len(steps))]


def returns_ints(prompt: str, steps: list[str], answer: str | None) -> list[int]:
    return [1] * len(steps)


def returns_too_few(prompt: str, steps: list[str], answer: str | None) -> list[bool]:
    return [True]


# ----------------------------------------------------------------------------------------------
# exact
# ----------------------------------------------------------------------------------------------


def test_first_error_labels() -> None:
    assert first_error_labels(4, -1) == [True, True, True, True]
    assert first_error_labels(4, 2) == [True, True, False, False]
    assert first_error_labels(4, 0) == [False, False, False, False]
    # the first error is a line never written: the last step (which ended the response) is wrong
    assert first_error_labels(3, 3) == [True, True, False]


def test_exact_labeler() -> None:
    label = make_labeler("exact", LabelerOptions(modulus=7))
    wrong_mid = ["3+4=0", "0*2=1", "1-1=0", "Answer: 0"]  # 0*2 is 0, not 1
    no_answer = ["3+4=0", "0*2=0", "0-1=6"]
    extra_line = [*RIGHT, "Answer: 6"]
    got = label([sol(RIGHT, 1.0, sample=3), sol(wrong_mid), sol(no_answer), sol(extra_line)])
    assert [ex.labels for ex in got] == [
        [True, True, True, True],
        [True, False, False, False],
        [True, True, False],
        [True, True, True, True, False],
    ]
    assert [ex.cost for ex in got] == [
        {"teacher_labels": n, "mc_rollouts": 0} for n in (4, 4, 3, 5)
    ]
    assert got[0].completions == RIGHT and got[0].prompt == PROBLEM and got[0].answer == "6"
    assert got[0].extra == {"sample": 3} and got[0].label_values is None
    # modulus 5: 3+4 is 2, so the first step is already wrong
    assert make_labeler("exact", LabelerOptions(modulus=5))([sol(RIGHT)])[0].labels == [False] * 4
    with pytest.raises(ConfigError, match="labeler 'exact': not an arithmetic chain prompt"):
        label([sol(RIGHT, prompt="What is 2+2?")])


# ----------------------------------------------------------------------------------------------
# Monte-Carlo labelers with a fake continuation sampler
# ----------------------------------------------------------------------------------------------


class FakeContinuations:
    """Outcomes chosen per prefix (solution i, steps kept h); records every call."""

    def __init__(self, table: dict[tuple[int, int], list[float]]) -> None:
        self.table = table
        self.calls: list[tuple[list[tuple[int, int]], int]] = []

    def __call__(
        self, solutions: Sequence[StepSolution], prefixes: Sequence[tuple[int, int]], n_mc: int
    ) -> list[list[float]]:
        self.calls.append((list(prefixes), n_mc))
        return [self.table[p] for p in prefixes]


def test_mc_hard_labels_and_cost() -> None:
    fake = FakeContinuations(
        {
            (0, 1): [0.0, 0.0, 1.0],  # one success of three: good
            (0, 2): [0.0, 0.0, 0.0],
            (2, 1): [1.0, 1.0, 1.0],
        }
    )
    label = make_labeler("mc_hard", LabelerOptions(n_mc=3, continuations=fake))
    three_steps = sol(["a", "b", "c"], outcome=0.0)
    one_step = sol(["x"], outcome=1.0)  # no prefix to roll out: its label is its outcome
    two_steps = sol(["p", "q"], outcome=0.0)
    got = label([three_steps, one_step, two_steps])
    assert fake.calls == [([(0, 1), (0, 2), (2, 1)], 3)]  # one batched call, solution-major
    assert [ex.labels for ex in got] == [[True, False, False], [True], [True, False]]
    assert [ex.cost["mc_rollouts"] for ex in got] == [6, 0, 3]  # n_mc * (H - 1)
    assert all(ex.cost["teacher_labels"] == 0 and ex.label_values is None for ex in got)
    assert total_cost(got) == {"teacher_labels": 0, "mc_rollouts": 9}


def test_mc_soft_values_threshold_and_cost() -> None:
    fake = FakeContinuations({(0, 1): [1.0, 1.0, 0.0, 0.0], (0, 2): [1.0, 0.0, 0.0, 0.0]})
    solutions = [sol(["a", "b", "c"], outcome=1.0)]
    got = make_labeler("mc_soft", LabelerOptions(n_mc=4, continuations=fake))(solutions)[0]
    assert got.label_values == [0.5, 0.25, 1.0]
    assert got.labels == [True, False, True]  # share >= 0.5
    assert got.cost == {"teacher_labels": 0, "mc_rollouts": 8}
    strict = make_labeler("mc_soft", LabelerOptions(n_mc=4, threshold=0.6, continuations=fake))
    assert strict(solutions)[0].labels == [False, False, True]
    # a continuation scored below 0.5 by a graded verifier is no success
    graded = FakeContinuations({(0, 1): [0.4, 0.4, 0.4, 0.6], (0, 2): [0.0] * 4})
    soft = make_labeler("mc_soft", LabelerOptions(n_mc=4, continuations=graded))
    assert soft([sol(["a", "b", "c"], outcome=0.0)])[0].label_values == [0.25, 0.0, 0.0]


def test_mc_labeler_errors() -> None:
    with pytest.raises(ConfigError, match="labeler 'mc_hard' samples continuations"):
        make_labeler("mc_hard")([sol(["a", "b"])])
    short = FakeContinuations({(0, 1): [1.0]})  # 1 outcome where n_mc=2 are due
    with pytest.raises(ValueError, match="each must hold n_mc=2 outcomes"):
        make_labeler("mc_hard", LabelerOptions(n_mc=2, continuations=short))([sol(["a", "b"])])
    with pytest.raises(ConfigError, match="threshold must be in"):
        make_labeler("mc_soft", LabelerOptions(threshold=1.5))


def test_rollout_continuations_roll_out_after_each_step() -> None:
    """The policy-backed sampler continues from prompt + the response up to step h's last
    token, and judges the prefix text + the continuation."""
    seen: dict[str, Any] = {}

    def rollout(model, prefixes, prompts, columns, sampling, group_size):  # noqa: ANN001, ANN202
        seen.update(prefixes=prefixes, prompts=prompts, columns=columns, n=group_size)
        return SimpleNamespace(
            completions=["Z", "Y"] * len(prefixes),
            prompts=[p for p in prompts for _ in range(group_size)],
            columns={k: [v for v in vs for _ in range(group_size)] for k, vs in columns.items()},
        )

    def verifier(prompts: list[str], completions: list[str], columns: dict) -> torch.Tensor:
        return torch.tensor([1.0 if c.endswith("Z") else 0.0 for c in completions])

    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(map(str, ids)))
    record = SimpleNamespace(prompt_ids=[1, 2], response_ids=[3, 4, 5, 6, 7], step_ends=[1, 2, 4])
    row = SimpleNamespace(text="prompt text", columns={"answer": "6"})
    fn = rollout_continuations(SimpleNamespace(rollout=rollout), None, tokenizer, verifier, None)
    solution = StepSolution("p", ["34", "5", "67"], "6", 0.0, handle=(record, row))
    outcomes = fn([solution], [(0, 1), (0, 2)], 2)
    assert seen["prefixes"] == [[1, 2, 3, 4], [1, 2, 3, 4, 5]]
    assert seen["prompts"] == ["prompt text"] * 2 and seen["n"] == 2
    assert seen["columns"] == {"answer": ["6", "6"]}
    assert outcomes == [[1.0, 0.0], [1.0, 0.0]]


def test_record_steps_cut_at_step_ends() -> None:
    from rl.engine.start_model import build_tokenizer
    from rl.rollout.steps import response_step_spans

    tok = build_tokenizer()
    ids = tok("3+4=0\n0*2=0\nAnswer: 0")["input_ids"] + [tok.eos_token_id]
    ends = [end for _, end in response_step_spans(tok, ids, "\n")]
    assert record_steps(tok, ids, ends) == ["3+4=0", "0*2=0", "Answer: 0"]


# ----------------------------------------------------------------------------------------------
# User callables and names
# ----------------------------------------------------------------------------------------------


def test_callable_labeler_by_import_path() -> None:
    label = make_labeler("tests.test_prm_data:even_steps_good")
    got = label([sol(["a", "b", "c"]), sol(["d"])])
    assert [ex.labels for ex in got] == [[True, False, True], [True]]
    assert [ex.cost for ex in got] == [
        {"teacher_labels": 3, "mc_rollouts": 0},
        {"teacher_labels": 1, "mc_rollouts": 0},
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "tests.test_prm_data:returns_ints",
            "labeler 'tests.test_prm_data:returns_ints' returned [1, 1] for prompt "
            "'3 +4 *2 -1': expected a list of 2 booleans (one per step)",
        ),
        ("tests.test_prm_data:returns_too_few", "returned [True] for prompt"),
    ],
)
def test_callable_labeler_bad_output(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_labeler(spec)([sol(["a", "b"])])
    assert message in str(err.value)


def test_labeler_names() -> None:
    with pytest.raises(
        ConfigError, match="unknown step labeler 'mc_hrad' \\(did you mean 'mc_hard'"
    ):
        make_labeler("mc_hrad")
    with pytest.raises(ConfigError, match="no attribute 'nope'"):
        make_labeler("tests.test_prm_data:nope")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def examples() -> list[StepExample]:
    return [
        StepExample(
            prompt="3 +4 *2 -1",
            completions=["3+4=0", "0*2=0"],
            labels=[True, False],
            answer="6",
            label_values=[0.75, 0.0],
            cost={"teacher_labels": 0, "mc_rollouts": 8},
            extra={"prompt_index": 5, "sample": 1, "outcome": 0.0},
        ),
        StepExample(
            prompt="ünïcode prompt",
            completions=["only step"],
            labels=[True],
            answer=None,
            label_values=None,
            cost={"teacher_labels": 1, "mc_rollouts": 0},
            extra={"prompt_index": 7, "sample": 0, "outcome": 1.0},
        ),
    ]


@pytest.mark.parametrize("file_format", ["jsonl", "datasets"])
def test_round_trip(tmp_path: Path, file_format: str) -> None:
    name = "data.jsonl" if file_format == "jsonl" else "data"
    path = write_step_dataset(examples(), tmp_path / name, file_format)  # type: ignore[arg-type]
    assert read_step_dataset(path) == examples()
    assert read_step_dataset(tmp_path) == examples()  # a make_prm_data output directory
    assert read_step_dataset(path, format="stepwise") == examples()


def test_jsonl_rows_are_trl_stepwise(tmp_path: Path) -> None:
    path = write_jsonl(examples(), tmp_path / "d.jsonl")
    row = json.loads(path.read_text().splitlines()[0])
    assert row["prompt"] == "3 +4 *2 -1"
    assert row["completions"] == ["3+4=0", "0*2=0"] and row["labels"] == [True, False]
    assert row["prompt_index"] == 5 and row["cost"] == {"teacher_labels": 0, "mc_rollouts": 8}


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prm800k_style_rows_with_extra_columns(tmp_path: Path) -> None:
    row = {"prompt": "Q?", "completions": ["s1", "s2"], "labels": [True, False], "index": 9}
    got = read_step_dataset(write_rows(tmp_path / "prm800k.jsonl", [row]))
    assert got == [StepExample("Q?", ["s1", "s2"], [True, False], extra={"index": 9})]


SHEPHERD_INPUT = (
    "Tom has 3 apples and buys 2+1 more. How many? Step 1: 2+1=3 ки\n"
    "Step 2: 3+3=7 ки\nStep 3: The answer is: 7 ки"
)
SHEPHERD_LABEL = (
    "Tom has 3 apples and buys 2+1 more. How many? Step 1: 2+1=3 +\n"
    "Step 2: 3+3=7 -\nStep 3: The answer is: 7 -"
)


@pytest.mark.parametrize("fmt", [None, "math_shepherd"])
def test_math_shepherd_parse(tmp_path: Path, fmt: Any) -> None:
    row = {"input": SHEPHERD_INPUT, "label": SHEPHERD_LABEL, "task": "GSM8K"}
    got = read_step_dataset(write_rows(tmp_path / "shepherd.jsonl", [row]), format=fmt)
    assert got == [
        StepExample(
            prompt="Tom has 3 apples and buys 2+1 more. How many?",
            completions=["2+1=3", "3+3=7", "The answer is: 7"],
            labels=[True, False, False],
            extra={"task": "GSM8K"},
        )
    ]


# ----------------------------------------------------------------------------------------------
# Bad input: one line, naming file, row and value
# ----------------------------------------------------------------------------------------------

GOOD = {"prompt": "Q?", "completions": ["a", "b"], "labels": [True, False]}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({**GOOD, "labels": [True, False, True]}, "line 2: 2 completions but 3 labels"),
        ({**GOOD, "labels": [1, 0]}, "line 2: labels[0] is 1 (int), not a boolean"),
        ({**GOOD, "labels": [True, "no"]}, "line 2: labels[1] is 'no' (str), not a boolean"),
        (
            {"prompt": "Q?", "completions": ["a"]},
            "line 2: missing column 'labels' (columns: ['completions', 'prompt'])",
        ),
        (
            {"completions": ["a"], "labels": [True]},
            "line 2: missing column 'prompt'",
        ),
        ({**GOOD, "completions": [], "labels": []}, "line 2: completions is an empty step list"),
        (
            {**GOOD, "label_values": [0.5]},
            "line 2: label_values must be 2 numbers in [0, 1] (one per step), got [0.5]",
        ),
    ],
)
def test_bad_stepwise_rows(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    path = write_rows(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(ConfigError) as err:
        read_step_dataset(path)
    assert f"{path} {message}" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (
            SHEPHERD_LABEL.replace("3+3=7 -", "3+3=7 ки"),
            "input has 3 step tags 'ки' but label holds 1 labels in their places",
        ),
        (
            SHEPHERD_LABEL.replace("7 -\nStep 3", "7\nStep 3"),
            "input has 3 step tags 'ки' but label holds 1 labels in their places",
        ),
        (SHEPHERD_LABEL + " +", "input has 3 step tags 'ки' but label holds 3 labels"),
    ],
)
def test_bad_math_shepherd_rows(tmp_path: Path, label: str, message: str) -> None:
    path = write_rows(tmp_path / "shepherd.jsonl", [{"input": SHEPHERD_INPUT, "label": label}])
    with pytest.raises(ConfigError) as err:
        read_step_dataset(path)
    assert f"{path} line 1: {message}" in str(err.value)
    assert "tag and label counts differ" in str(err.value) and "\n" not in str(err.value)


def test_math_shepherd_row_without_tags(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "s.jsonl", [{"input": "Q? no steps", "label": "Q? no steps"}])
    with pytest.raises(ConfigError, match="line 1: input has no step tag 'ки': an empty step"):
        read_step_dataset(path)


def test_bad_rows_in_a_datasets_directory(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_list([GOOD, {**GOOD, "labels": [True]}]).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="d row 1: 2 completions but 1 labels"):
        read_step_dataset(tmp_path / "d")


def test_unknown_columns_and_paths(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"question": "Q?", "steps": ["a"]}])
    with pytest.raises(ConfigError, match="line 1: cannot tell the step-label format"):
        read_step_dataset(path)
    with pytest.raises(ConfigError, match="not one of stepwise, math_shepherd"):
        read_step_dataset(path, format="prm800k")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="step-label data not found"):
        read_step_dataset(tmp_path / "missing.jsonl")


def test_until_first_error_cuts_after_the_first_wrong_step() -> None:
    from rl.prm.data import until_first_error

    wrong = StepExample(
        "p",
        ["a", "b", "c", "d"],
        [True, False, False, False],
        label_values=[0.9, 0.2, 0.1, 0.0],
        cost={"teacher_labels": 4, "mc_rollouts": 0},
    )
    cut = until_first_error(wrong)
    assert cut.completions == ["a", "b"] and cut.labels == [True, False]
    assert cut.label_values == [0.9, 0.2] and cut.cost["teacher_labels"] == 2
    assert wrong.labels == [True, False, False, False]  # the input is not changed
    right = StepExample("p", ["a", "b"], [True, True])
    assert until_first_error(right) is right
    first = StepExample("p", ["a", "b"], [False, False])
    assert until_first_error(first).completions == ["a"]
