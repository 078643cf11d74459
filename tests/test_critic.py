"""Fast checks for the critic's pure helpers and the gae credit's config rules."""

from __future__ import annotations

import pytest
import torch

from rl.config import load_config
from rl.core.errors import ConfigError
from rl.trainer.critic import explained_variance, response_values
from rl.trainer.loop import resolve_credit
from tests.launcher import REPO

CONFIG = REPO / "configs" / "quickstart.yaml"


def test_response_values_reads_the_state_before_each_response_token() -> None:
    # Tp = 3 (prompt columns 0..2), Tr = 2: V of response token 0 is read at column 2 (the
    # last prompt token), of token 1 at column 3; the output at the last column (after the
    # final token) is never read: the state after the last token is terminal.
    values = torch.tensor([[10.0, 11.0, 12.0, 13.0, 14.0], [20.0, 21.0, 22.0, 23.0, 24.0]])
    out = response_values(values, prompt_length=3)
    torch.testing.assert_close(out, torch.tensor([[12.0, 13.0], [22.0, 23.0]]))
    # the same columns as logits: logits[:, Tp - 1 : -1] predict the response tokens
    logits = values.unsqueeze(-1)  # [B, T, 1]
    torch.testing.assert_close(out, logits[:, 3 - 1 : -1, 0])


@pytest.mark.parametrize("prompt_length", [0, 5])
def test_response_values_rejects_bad_prompt_length(prompt_length: int) -> None:
    with pytest.raises(ValueError):
        response_values(torch.zeros(2, 5), prompt_length)


def test_explained_variance_by_hand() -> None:
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    values = torch.tensor([1.5, 1.5, 3.5, 3.5], dtype=torch.float64)
    diff = returns - values  # [-0.5, 0.5, -0.5, 0.5]: var 0.25; var(R) = 1.25
    moments = torch.tensor(
        [returns.sum(), (returns**2).sum(), diff.sum(), (diff**2).sum(), 4.0],
        dtype=torch.float64,
    )
    assert explained_variance(moments) == pytest.approx(1 - 0.25 / 1.25)
    perfect = torch.tensor([returns.sum(), (returns**2).sum(), 0.0, 0.0, 4.0])
    assert explained_variance(perfect) == pytest.approx(1.0)
    constant = torch.tensor([4.0, 4.0, 4.0, 4.0, 4.0])  # R = 1 everywhere: no variance
    assert explained_variance(constant) == 0.0


def test_gae_credit_is_valid_with_and_without_heads() -> None:
    cfg = load_config(CONFIG, ["algo.credit=gae"])
    assert resolve_credit(cfg, []).name == "gae"
    assert resolve_credit(cfg, [(object(), 1.0)]).name == "gae"  # type: ignore[list-item]


def test_kl_in_reward_needs_gae() -> None:
    cfg = load_config(CONFIG, ["algo.kl_mode=reward", "algo.kl_coef=0.1"])
    with pytest.raises(ConfigError, match=r"algo.kl_mode=reward needs algo.credit=gae"):
        resolve_credit(cfg, [])
    cfg = load_config(CONFIG, ["algo.kl_mode=reward", "algo.kl_coef=0.1", "algo.credit=gae"])
    assert resolve_credit(cfg, []).name == "gae"


def test_unknown_credit_lists_gae() -> None:
    with pytest.raises(ConfigError, match="gae"):
        load_config(CONFIG, ["algo.credit=nope"])
