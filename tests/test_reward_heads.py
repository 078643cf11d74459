"""Reward-head plug-ins: resolution by name and import path, and checked_score's errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from rewards.build import resolve_head
from rewards.heads import REWARD_HEADS, HeadBatch, HeadOutput, RewardHead, checked_score
from rl.core.errors import ConfigError, RewardError


class ToyHead(RewardHead):
    """Outcome head: `scale * len(completion)` on each row's last response token."""

    granularity = "outcome"

    def __init__(self, scale: float = 1.0, name: str = "toy", mode: str = "ok") -> None:
        self.name = name
        self.scale = scale
        self.mode = mode
        self.updates = 0

    def score(self, batch: HeadBatch) -> HeadOutput:
        if self.mode == "raise":
            raise RuntimeError("model exploded\nsecond line")
        r = torch.zeros(batch.batch_size, batch.response_length)
        last = batch.response_mask.sum(dim=1).long() - 1  # [B]
        vals = torch.tensor([self.scale * len(c) for c in batch.completions])
        r[torch.arange(batch.batch_size), last] = vals
        if self.mode == "short":
            r = r[:, :-1]
        if self.mode == "nan":
            r[1, 0] = float("nan")
            r[3, 1] = float("inf")
            r[2, 2] = float("nan")  # row 2 has 2 response tokens: off-mask, ignored
        return HeadOutput(token_rewards=r, metrics={"mean": float(vals.mean())})

    def update(self, batch: HeadBatch, outcome: Tensor) -> dict[str, float]:
        self.updates += 1
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.scale = d["scale"]


if "toy_test_head" not in REWARD_HEADS:
    REWARD_HEADS.register("toy_test_head")(ToyHead)


def _batch() -> HeadBatch:
    # B = 4, Tp = 2, Tr = 3; response lengths 3, 1, 2, 3
    response_mask = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    )
    step_id = torch.where(response_mask.bool(), 0, -1)
    step_end = torch.zeros(4, 3)
    step_end[torch.arange(4), response_mask.sum(dim=1).long() - 1] = 1.0
    return HeadBatch(
        input_ids=torch.ones(4, 5, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(4, 2), response_mask], dim=1),
        response_mask=response_mask,
        prompt_length=2,
        step_id=step_id,
        step_end=step_end,
        completions=["abc", "d", "ef", "ghij"],
        group_size=2,
    )


def test_resolve_by_import_path_and_name() -> None:
    head = resolve_head("tests.test_reward_heads:ToyHead", {"scale": 2.0})
    assert isinstance(head, ToyHead) and isinstance(head, RewardHead)
    assert head.scale == 2.0
    head = resolve_head("toy_test_head", {"name": "mine"})
    assert isinstance(head, ToyHead) and head.name == "mine"
    head.load_state_dict({"scale": 3.0})
    assert head.state_dict() == {"scale": 3.0}


def test_resolve_errors_name_the_spec() -> None:
    with pytest.raises(ConfigError, match="unknown reward head 'toy_test_haed'.*toy_test_head"):
        resolve_head("toy_test_haed", {})
    with pytest.raises(RewardError, match="'tests.nope:X': no module named 'tests.nope'"):
        resolve_head("tests.nope:X", {})
    with pytest.raises(RewardError, match="'tests.test_reward_heads:Nope'.*no attribute"):
        resolve_head("tests.test_reward_heads:Nope", {})
    with pytest.raises(ConfigError, match="'tests.test_reward_heads:ToyHead': bad arguments"):
        resolve_head("tests.test_reward_heads:ToyHead", {"bogus": 1})
    with pytest.raises(RewardError, match="'tests.test_reward_heads:_batch' must be a class"):
        resolve_head("tests.test_reward_heads:_batch", {})


def test_checked_score_ok() -> None:
    # last-token rewards = len(completion): row 0 -> 3 at t=2, row 1 -> 1 at t=0, ...
    out = checked_score(ToyHead(), _batch())
    expected = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
    torch.testing.assert_close(out.token_rewards, expected)
    assert out.metrics == {"mean": 2.5}  # (3 + 1 + 2 + 4) / 4


def test_checked_score_raising_head() -> None:
    with pytest.raises(RewardError, match="^reward head 'boom' raised RuntimeError: model") as e:
        checked_score(ToyHead(name="boom", mode="raise"), _batch())
    assert "\n" not in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_checked_score_wrong_shape() -> None:
    with pytest.raises(RewardError, match=r"'short'.*expected \[B, Tr\] = \[4, 3\], got \[4, 2\]"):
        checked_score(ToyHead(name="short", mode="short"), _batch())


def test_checked_score_nan_names_rows() -> None:
    # NaN in row 1 (t=0, in the response) and inf in row 3; row 2's NaN is off the response
    with pytest.raises(RewardError, match="'nanny'.*2 row\\(s\\): batch rows 1, 3$"):
        checked_score(ToyHead(name="nanny", mode="nan"), _batch())
