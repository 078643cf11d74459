"""PRM training (rl/prm/train.py) and active selection (rl/prm/active.py), on one process with
a tiny random model: the loss and scores by hand, the split, learning a separable dataset
(and not learning shuffled labels), and what active selection buys and skips."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from rl.config import PRMConfig, load_config
from rl.core.errors import ConfigError
from rl.engine.start_model import build_tokenizer
from rl.prm.active import (
    LabelOracle,
    Selection,
    budget_size,
    ensemble_bce,
    round_sizes,
    select_pool,
    train_with_budget,
)
from rl.prm.fitting import (
    StepRow,
    first_bad,
    prm_scores,
    split_examples,
    step_auc,
    tag_bce,
)
from rl.prm.train import check_prm_config
from tests.models import tiny_llama


@dataclass
class Example:
    prompt: str
    completions: list[str]
    labels: list[bool]
    label_values: list[float] | None = None
    cost: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Maths by hand
# ----------------------------------------------------------------------------------------------


def test_tag_bce_by_hand() -> None:
    z = torch.tensor([[0.0, 2.0, 5.0], [-1.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.25, 0.0, 0.0]])
    step_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the 5.0 is padding
    total, count = tag_bce(z, targets, step_mask, torch.tensor([1.0, 1.0]))
    soft = -(0.25 * math.log(1 / (1 + math.e)) + 0.75 * math.log(1 - 1 / (1 + math.e)))
    want = math.log(2) + math.log(1 + math.e**2) + soft
    assert float(total) == pytest.approx(want) and float(count) == 3
    # a padding row (weight 0) counts for nothing
    total, count = tag_bce(z, targets, step_mask, torch.tensor([1.0, 0.0]))
    assert float(total) == pytest.approx(math.log(2) + math.log(1 + math.e**2))
    assert float(count) == 2


def test_ensemble_bce_respects_head_mask() -> None:
    z = torch.tensor([[[0.0, 3.0]]])  # [b=1, H=1, K=2]
    targets, step_mask = torch.tensor([[1.0]]), torch.tensor([[1.0]])
    total, count = ensemble_bce(z, targets, step_mask, torch.ones(1), torch.tensor([[1.0, 0.0]]))
    assert float(total) == pytest.approx(math.log(2)) and float(count) == 1
    total, count = ensemble_bce(z, targets, step_mask, torch.ones(1), torch.ones(1, 2))
    assert float(total) == pytest.approx(math.log(2) + math.log(1 + math.exp(-3)))
    assert float(count) == 2


def test_step_auc_by_hand() -> None:
    # good steps 0.35 and 0.8 against bad 0.1 and 0.4: 3 of 4 pairs ordered
    assert step_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert step_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)  # a tie counts one half
    assert step_auc([0.9, 0.1], [False, True]) == pytest.approx(0.0)
    assert step_auc([0.2, 0.3], [True, True]) is None


def test_prm_scores_first_error_f1() -> None:
    labels = [[True, False, False], [True, True], [False]]
    assert [first_bad(y) for y in labels] == [1, -1, 0]
    # predictions: first error at 1 (right), none (right), none (wrong: missed step 0)
    probs = [[0.9, 0.2, 0.1], [0.8, 0.7], [0.6]]
    scores = prm_scores(probs, labels)
    assert scores["acc_error"] == pytest.approx(0.5) and scores["acc_correct"] == 1.0
    assert scores["f1"] == pytest.approx(2 * 0.5 / 1.5)
    assert scores["auc"] == pytest.approx(1.0)  # good 0.9 0.8 0.7 all above bad 0.2 0.1 0.6
    scores = prm_scores([[0.9, 0.2, 0.1], [0.8, 0.5], [0.6]], labels)
    assert scores["auc"] == pytest.approx(8 / 9)  # 0.5 (good) is below 0.6 (bad)
    assert scores["acc_correct"] == 1.0  # 0.5 is not below the threshold


def test_budget_sizes() -> None:
    assert budget_size(200, 0.01) == 2 and budget_size(200, 0.03) == 6
    assert budget_size(10, 0.01) == 1 and budget_size(10, 1.0) == 10
    assert round_sizes(7, 3) == [3, 2, 2] and round_sizes(2, 3) == [1, 1]


# ----------------------------------------------------------------------------------------------
# A separable dataset
# ----------------------------------------------------------------------------------------------


def separable(n: int, seed: int, steps: int = 3) -> list[Example]:
    """Solutions whose steps end in `y` while right and in `n` from the first error on; the
    first error is uniform over the steps and "none"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(str(rng.randrange(10)) for _ in range(3))
        first = rng.randrange(-1, steps)
        labels = [first == -1 or h < first for h in range(steps)]
        completions = [
            f"{rng.randrange(10)}{rng.choice('+-*')}{rng.randrange(10)}=" + ("y" if ok else "n")
            for ok in labels
        ]
        out.append(Example(prompt, completions, labels))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy")
    tok = build_tokenizer()
    tiny_llama(len(tok), num_layers=1, tie_word_embeddings=True).save_pretrained(path)
    tok.save_pretrained(path)
    return path


FAST = PRMConfig(epochs=4, lr=3e-3, micro_batch_size=8, eval_batch_size=64)


def test_learns_separable_labels_and_not_shuffled_ones(tmp_path: Path, model_dir: Path) -> None:
    train, val = separable(96, seed=1), separable(48, seed=2)
    got = train_with_budget(
        train, 1.0, "uniform", 0, model_path=model_dir, val_examples=val, prm=FAST,
        out_dir=tmp_path / "prm",
    )  # fmt: skip
    assert got["auc"] > 0.9, got["record"]["epochs"]
    assert got["f1"] > 0.8, got["record"]["epochs"]
    assert got["teacher_labels"] == 96 * 3 and got["skipped_solutions"] == 0
    # the saved PRM reads the held-out steps as the run measured them
    from rl.prm.model import load_prm, step_probabilities

    model, tok = load_prm(tmp_path / "prm")
    probs = step_probabilities(model, tok, [e.prompt for e in val], [e.completions for e in val])
    assert prm_scores(probs, [e.labels for e in val])["auc"] == pytest.approx(got["auc"])
    # every step label shuffled over all steps (position too): nothing left to learn
    rng = random.Random(0)
    flat = [y for e in train for y in e.labels]
    rng.shuffle(flat)
    shuffled = [
        Example(e.prompt, e.completions, flat[3 * i : 3 * i + 3]) for i, e in enumerate(train)
    ]
    control = train_with_budget(
        shuffled, 1.0, "uniform", 0, model_path=model_dir, val_examples=val, prm=FAST
    )
    # the run beats predicting the training label rate everywhere; the control does not (its
    # AUC is no guide: y/n separates the held-out steps, so any tiny learnt lean is 0 or 1)
    rate = sum(flat) / len(flat)
    val_labels = [y for e in val for y in e.labels]
    constant = -sum(math.log(rate if y else 1 - rate) for y in val_labels) / len(val_labels)
    assert got["val_loss"] < constant - 0.3
    assert control["val_loss"] > constant - 0.02, (constant, control["record"]["epochs"])
    assert control["f1"] < 0.5


def test_two_class_head_learns(model_dir: Path) -> None:
    prm = PRMConfig(head="two_class", epochs=4, lr=3e-3, micro_batch_size=8)
    got = train_with_budget(
        separable(96, 3), 1.0, "uniform", 0, model_path=model_dir,
        val_examples=separable(48, 4), prm=prm,
    )  # fmt: skip
    assert got["auc"] > 0.9, got["record"]["epochs"]


def test_soft_labels_are_the_targets() -> None:
    from rl.prm.fitting import example_targets

    ex = Example("p", ["a", "b"], [True, False], label_values=[0.75, 0.25])
    assert example_targets(ex, soft=True) == (0.75, 0.25)
    assert example_targets(ex, soft=False) == (1.0, 0.0)
    assert example_targets(Example("p", ["a"], [True]), soft=True) == (1.0,)


def test_split_by_prompt() -> None:
    examples = [Example(f"q{i % 10}", ["a"], [True]) for i in range(40)]
    train, val = split_examples(examples, 0.2, seed=0)
    held = {examples[i].prompt for i in val}
    assert len(held) == 2 and len(val) == 8 and len(train) == 32
    assert not held & {examples[i].prompt for i in train}
    assert split_examples(examples, 0.2, seed=0) == (train, val)


# ----------------------------------------------------------------------------------------------
# Active selection
# ----------------------------------------------------------------------------------------------


class Watched:
    """An example that records whether its labels were read."""

    def __init__(self, index: int, steps: int, seen: set[int]) -> None:
        self.index, self.prompt = index, f"q{index}"
        self.completions = ["s"] * steps
        self._seen = seen

    @property
    def labels(self) -> list[bool]:
        self._seen.add(self.index)
        return [True] * len(self.completions)


@dataclass
class FakeSelector:
    """Scores a row by its first token id (the pool index), as a trained ensemble would."""

    scores: dict[int, float]
    history: list[float] = field(default_factory=list)
    trained_on: list[list[int]] = field(default_factory=list)

    def train(self, rows: Any, keys: Any, epochs: int, round_index: int) -> None:
        self.trained_on.append(list(keys))
        self.history.append(0.0)

    def score(self, rows: list[StepRow]) -> list[float]:
        return [self.scores[r.ids[0]] for r in rows]


def test_uncertainty_selection_buys_the_most_uncertain_and_counts_skipped() -> None:
    seen: set[int] = set()
    examples = [Watched(i, steps=1 + i % 3, seen=seen) for i in range(12)]
    pool = [StepRow(ids=[i, 99], positions=[1]) for i in range(12)]
    oracle = LabelOracle(examples)
    uncertain = {i: 0.0 for i in range(12)} | {7: 0.9, 2: 0.8, 11: 0.7, 5: 0.6}
    fake = FakeSelector(uncertain)
    picked: Selection = select_pool(pool, oracle, 6, "uncertainty", 0, 2, lambda: fake, 1)  # type: ignore[arg-type, return-value]
    first = picked.chosen[:3]  # round 0 is random (nothing learnt yet)
    rest = [i for i in (7, 2, 11, 5) if i not in first]
    assert picked.chosen[3:] == rest[:3]
    assert fake.trained_on == [first]  # the ensemble trained on round 0's labels only
    assert seen == set(picked.chosen) and oracle.bought == picked.chosen  # nothing else read
    assert oracle.teacher_labels() == sum(1 + i % 3 for i in picked.chosen)
    assert all(r.labels is not None for r in picked.rows)


def test_uniform_selection_is_seeded_and_the_same_size() -> None:
    seen: set[int] = set()
    examples = [Watched(i, 2, seen) for i in range(20)]
    pool = [StepRow(ids=[i], positions=[0]) for i in range(20)]
    a = select_pool(pool, LabelOracle(examples), 5, "uniform", 3, 3, None, 1)
    b = select_pool(pool, LabelOracle(examples), 5, "uniform", 3, 3, None, 1)
    assert a.chosen == b.chosen and len(set(a.chosen)) == 5 and seen == set(a.chosen)


def test_train_with_budget_counts_labels(model_dir: Path) -> None:
    pool, val = separable(40, 5), separable(12, 6)
    prm = PRMConfig(epochs=1, lr=3e-3, micro_batch_size=8, select_rounds=2, selector_epochs=1)
    for selection in ("uncertainty", "uniform"):
        got = train_with_budget(
            pool, 0.25, selection, 1, model_path=model_dir, val_examples=val, prm=prm
        )
        record = got["record"]["selection"]
        assert got["labelled_solutions"] == 10 and got["skipped_solutions"] == 30
        assert got["teacher_labels"] == 30 and record["skipped_steps"] == 90
        assert record["rounds"] == (2 if selection == "uncertainty" else 1)
        assert len(record["selector_loss"]) == (1 if selection == "uncertainty" else 0)
        assert 0.0 <= got["auc"] <= 1.0
    # synthetic wrong steps: trained on beside the bought labels, and not counted as bought
    prm = replace(prm, synthetic_negatives=0.5)
    got = train_with_budget(
        pool, 0.25, "uniform", 1, model_path=model_dir, val_examples=val, prm=prm
    )
    assert (
        got["teacher_labels"] == 30 and 0 < got["record"]["selection"]["synthetic_negatives"] <= 5
    )


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def test_prm_config_errors(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("")
    with pytest.raises(ConfigError, match="prm.data: the step-label dataset is required"):
        check_prm_config(PRMConfig())
    with pytest.raises(ConfigError, match="does not exist"):
        check_prm_config(PRMConfig(data=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError, match="prm.budget_frac"):
        load_config(None, ["prm.budget_frac=0.0"])
    with pytest.raises(ConfigError, match="prm.ensemble_heads"):
        load_config(None, ["prm.ensemble_heads=1"])
    with pytest.raises(ConfigError, match="good_token and bad_token"):
        check_prm_config(PRMConfig(data=str(data), good_token="+", bad_token="+"))
    with pytest.raises(ConfigError, match="prm.head: 'three' is not one of"):
        load_config(None, ["prm.head=three"])
    with pytest.raises(ConfigError, match="prm.selection"):
        load_config(None, ["prm.selection=greedy"])
    with pytest.raises(ConfigError, match="prm.validate_every: must be at least 1, got 0"):
        load_config(None, ["prm.validate_every=0"])
    with pytest.raises(ConfigError, match="prm.keep"):
        load_config(None, ["prm.keep=median"])
    with pytest.raises(ConfigError, match="selection 'greedy'"):
        train_with_budget([], 0.5, "greedy", 0, model_path=tmp_path)


def test_multi_token_tag_fails_before_training(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="step tag '<step>' is 6 tokens") as excinfo:
        train_with_budget(
            separable(4, 0), 1.0, "uniform", 0, model_path=model_dir,
            prm=PRMConfig(step_tag="<step>"),
        )  # fmt: skip
    assert "\n" not in str(excinfo.value)
    added = PRMConfig(step_tag="<step>", add_tag_token=True, epochs=1)
    got = train_with_budget(
        separable(8, 0), 1.0, "uniform", 0, model_path=model_dir,
        val_examples=separable(4, 1), prm=added,
    )  # fmt: skip
    assert got["teacher_labels"] == 24


@pytest.mark.parametrize(
    ("keep", "validate_every", "kept", "validated"),
    [
        ("best", 1, 2, [1, 2, 3, 4, 5]),  # lowest validation loss
        ("best_f1", 1, 4, [1, 2, 3, 4, 5]),  # highest validation F1 (epoch 4, not 3: tie)
        ("best_f1", 2, 4, [2, 4, 5]),  # only validated epochs (every 2nd and the last)
        ("best", 2, 2, [2, 4, 5]),
        ("best_f1", 3, 5, [3, 5]),  # the last epoch is validated and better
        ("last", 2, 5, [2, 4, 5]),
    ],
)
def test_fit_prm_keeps_the_epoch_its_rule_selects(
    monkeypatch: pytest.MonkeyPatch,
    keep: str,
    validate_every: int,
    kept: int,
    validated: list[int],
) -> None:
    """Epoch e validates to loss LOSS[e] and F1 F1[e]: `best` keeps the lowest loss among
    the validated epochs, `best_f1` the highest F1 (the earlier one on a tie), `last` the
    last; with `validate_every` only every N-th epoch and the last are validated."""
    from rl.engine.deepspeed_engine import DistInfo
    from rl.prm import fitting

    loss = {1: 0.6, 2: 0.3, 3: 0.5, 4: 0.4, 5: 0.7}
    f1 = {1: 0.1, 2: 0.2, 3: 0.5, 4: 0.6, 5: 0.6}
    epoch = {"now": 0}
    seen: list[int] = []

    def train_epoch(*args: Any, **kwargs: Any) -> float:
        epoch["now"] += 1
        return 1.0

    def validate(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append(epoch["now"])
        return {"val_loss": loss[epoch["now"]], "val_f1": f1[epoch["now"]]}

    monkeypatch.setattr(fitting, "train_epoch", train_epoch)
    monkeypatch.setattr(fitting, "validate", validate)
    monkeypatch.setattr(fitting, "full_state", lambda engine: {"epoch": epoch["now"]})
    result = fitting.fit_prm(
        object(),
        [],
        ["a validation row"],  # type: ignore[list-item]
        DistInfo(rank=0, world_size=1, local_rank=0),
        epochs=5,
        micro_batch_size=1,
        eval_batch_size=1,
        pad_id=0,
        seed=0,
        keep=keep,
        validate_every=validate_every,
    )
    assert seen == validated
    assert result.kept_epoch == kept
    assert result.kept_state == {"epoch": kept}
