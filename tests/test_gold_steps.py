"""The `gold_steps` head: exact first-error step rewards of the built-in task, by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rewards.build import resolve_head
from rewards.gold_steps import GoldStepsHead
from rl.core.errors import ConfigError
from rl.core.types import HeadBatch

PROMPT = "3 +4 *2 -6"  # modulus 7: 3+4=0, 0*2=0, 0-6=1, Answer: 1
RIGHT = "3+4=0\n0*2=0\n0-6=1\nAnswer: 1"
SLIP = "3+4=0\n0*2=2\n2-6=3\nAnswer: 3"  # wrong from step 1
SHORT = "3+4=0"  # stops after step 0: the first missing line is step 1


def batch(columns: dict | None = None) -> HeadBatch:
    """Three responses of 8 tokens; two tokens per step (4 steps), the third only step 0."""
    full = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    short = torch.tensor([0, 0, -1, -1, -1, -1, -1, -1])
    step_id = torch.stack([full, full, short])  # [3, 8]
    step_end = torch.zeros(3, 8)
    step_end[:2, [1, 3, 5, 7]] = 1.0
    step_end[2, 1] = 1.0
    return HeadBatch(
        input_ids=torch.zeros(3, 10, dtype=torch.long),
        attention_mask=torch.ones(3, 10, dtype=torch.long),
        response_mask=(step_id >= 0).float(),
        prompt_length=2,
        completions=[RIGHT, SLIP, SHORT],
        columns={"prompt": [PROMPT] * 3} if columns is None else columns,
        step_id=step_id,
        step_end=step_end,
    )


def test_penalty_on_the_first_wrong_step_only() -> None:
    head = GoldStepsHead(penalty=0.5)
    head.setup(SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(task={}))))
    out = head.score(batch())
    want = torch.zeros(3, 8)
    want[1, 3] = -0.5  # the end of step 1 of the slipped response
    want[2, 1] = -0.5  # the short response: its last step carries the missing line's error
    assert torch.equal(out.token_rewards, want)
    assert out.metrics["wrong_step_frac"] == pytest.approx(2 / 3)
    assert head.first_errors(batch()).tolist() == [-1, 1, 0]


def test_step_values_are_one_before_the_first_error() -> None:
    values = GoldStepsHead().step_values(batch())
    assert values[0].tolist() == [1.0] * 8
    assert values[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    # the short response is right so far: its written step is valued 1 (a partial solution
    # in step-level search), although `score` penalises it for stopping early
    assert values[2].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert GoldStepsHead().first_errors(batch(), missing_is_error=False).tolist() == [-1, 1, -1]


def test_registered_and_checked() -> None:
    head = resolve_head("gold_steps", {"penalty": 2.0})
    assert isinstance(head, GoldStepsHead) and head.default_credit == "pav"
    with pytest.raises(ConfigError, match="penalty must be > 0"):
        GoldStepsHead(penalty=0.0)
    with pytest.raises(ConfigError, match="gold_steps head: needs the built-in task's `prompt`"):
        GoldStepsHead().score(batch(columns={"question": ["q"] * 3}))
