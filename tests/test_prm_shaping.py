"""PRM step-reward shapings and the PROF-style agreement filter against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from rl.algos.credit import (
    CREDIT_ASSIGNERS,
    CreditInputs,
    min_form_step_rewards,
    steps_to_tokens,
)
from rl.algos.prm_shaping import (
    PRM_SHAPINGS,
    SHAPING_CREDIT,
    ShapingParams,
    agreement_keep,
    response_scores,
    shape_step_rewards,
)
from rl.core.errors import ConfigError

# row 0: three steps; row 1: one step; row 2: no step (padding only); row 3: two steps
P = torch.tensor(
    [
        [0.9, 0.2, 0.7],
        [0.4, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [0.6, 0.3, 0.0],
    ]
)
MASK = torch.tensor(
    [
        [1.0, 1.0, 1.0],
        [1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 0.0],
    ]
)


def close(got: torch.Tensor, want: list[list[float]]) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-6)


def test_registry_names_and_credit() -> None:
    assert PRM_SHAPINGS.names() == ["clip", "delta", "first_error", "min", "prob"]
    assert SHAPING_CREDIT == {
        "prob": "pav",
        "min": "min_form",
        "clip": "pav",
        "delta": "sum",
        "first_error": "pav",
    }
    assert all(credit in CREDIT_ASSIGNERS for credit in SHAPING_CREDIT.values())


def test_prob() -> None:
    close(
        shape_step_rewards("prob", P, MASK),
        [[0.9, 0.2, 0.7], [0.4, 0, 0], [0, 0, 0], [0.6, 0.3, 0]],
    )


def test_min_is_p_minus_one_on_valid_steps() -> None:
    close(
        shape_step_rewards("min", P, MASK),
        [[-0.1, -0.8, -0.3], [-0.6, 0, 0], [0, 0, 0], [-0.4, -0.7, 0]],
    )


def test_min_feeds_min_form_credit_to_the_softmin() -> None:
    """The min-form weights put the sum of a row's rewards near its worst step's p - 1,
    and good steps after the worst one add (almost) nothing to the return-to-go."""
    rewards = shape_step_rewards("min", P, MASK)
    weighted = min_form_step_rewards(rewards, MASK, temperature=0.01)  # [B, H]
    totals = weighted.sum(dim=1)
    torch.testing.assert_close(totals, torch.tensor([-0.8, -0.6, 0.0, -0.7]), atol=1e-4, rtol=0)
    # row 0: after the worst step (0.2) the remaining step 0.7 -> w ~ e^-50: about 0
    assert abs(float(weighted[0, 2])) < 1e-6


def test_clip() -> None:
    params = ShapingParams(eta=0.5)
    close(
        shape_step_rewards("clip", P, MASK, params),
        [[0, -0.3, 0], [-0.1, 0, 0], [0, 0, 0], [0, -0.2, 0]],
    )
    close(
        shape_step_rewards("clip", P, MASK, ShapingParams(eta=1.0)),
        [[-0.1, -0.8, -0.3], [-0.6, 0, 0], [0, 0, 0], [-0.4, -0.7, 0]],
    )


def test_delta_telescopes_to_each_steps_own_score() -> None:
    rewards = shape_step_rewards("delta", P, MASK)
    # row 0: 0.9-0.2, 0.2-0.7, last 0.7; row 1 (one step): 0.4; row 3: 0.6-0.3, last 0.3
    close(rewards, [[0.7, -0.5, 0.7], [0.4, 0, 0], [0, 0, 0], [0.3, 0.3, 0]])
    # the return-to-go from step h is p_h on every valid step; 0 on padding
    returns = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(returns * MASK, P * MASK, atol=1e-6, rtol=0)


def test_delta_ignores_garbage_in_padded_steps() -> None:
    p = P.clone()
    p[1, 1:] = 0.99  # padding of the one-step row
    close(shape_step_rewards("delta", p, MASK)[1:2], [[0.4, 0, 0]])


def test_first_error() -> None:
    params = ShapingParams(threshold=0.5, penalty=2.0)
    close(
        shape_step_rewards("first_error", P, MASK, params),
        # row 0: step 1 (0.2) first below 0.5; row 1: its only step (0.4); row 2: none;
        # row 3: step 1 (0.3); padded zeros of p never count
        [[0, -2, 0], [-2, 0, 0], [0, 0, 0], [0, -2, 0]],
    )
    # only the first of several wrong steps
    p = torch.tensor([[0.1, 0.2, 0.9]])
    close(shape_step_rewards("first_error", p, torch.ones(1, 3), params), [[-2, 0, 0]])
    # nothing below the threshold: no penalty
    close(
        shape_step_rewards("first_error", P, MASK, ShapingParams(threshold=0.1)),
        [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
    )


def test_shapings_on_step_end_tokens() -> None:
    """Step rewards land on each step's last token (the head's placement)."""
    step_end = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float32)
    p = torch.tensor([[0.9, 0.2, 0.7], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    tokens = steps_to_tokens(shape_step_rewards("delta", p, mask), step_end)
    close(tokens, [[0, 0.7, 0, -0.5, 0.7, 0], [0, 0, 0.4, 0, 0, 0]])


def test_unknown_shaping_is_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        shape_step_rewards("minimum", P, MASK)
    msg = str(err.value)
    assert "\n" not in msg
    assert "'minimum'" in msg
    for name in ("clip", "delta", "first_error", "min", "prob"):
        assert name in msg


def test_bad_shapes_and_non_prefix_mask() -> None:
    with pytest.raises(ValueError, match="one shape"):
        shape_step_rewards("prob", P, MASK[:, :2])
    with pytest.raises(ValueError, match="prefix"):
        shape_step_rewards("prob", P[:1], torch.tensor([[1.0, 0.0, 1.0]]))


def test_response_scores_mean_and_min() -> None:
    score, has = response_scores(P, MASK, "mean")
    torch.testing.assert_close(score, torch.tensor([0.6, 0.4, 0.0, 0.45]), atol=1e-6, rtol=0)
    assert has.tolist() == [True, True, False, True]
    score, _ = response_scores(P, MASK, "min")
    torch.testing.assert_close(score, torch.tensor([0.2, 0.4, 0.0, 0.3]), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="'median'"):
        response_scores(P, MASK, "median")


def test_agreement_keep_mean() -> None:
    # mean scores: 0.6, 0.4, (none), 0.45
    outcome = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # row 0 right & high: keep; row 1 right but low: drop; row 2 no steps: keep;
    # row 3 wrong & low: keep
    assert agreement_keep(outcome, P, MASK, threshold=0.5).tolist() == [True, False, True, True]
    outcome = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # row 0 wrong but high: drop; row 1 wrong & low: keep; row 3 right but low: drop
    assert agreement_keep(outcome, P, MASK, threshold=0.5).tolist() == [False, True, True, False]


def test_agreement_keep_min_and_threshold_edge() -> None:
    outcome = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # min scores 0.2, 0.4, -, 0.3: under min every right row here has a bad step
    assert agreement_keep(outcome, P, MASK, 0.5, "min").tolist() == [False, False, True, False]
    # score == threshold counts as the PRM saying "right" (one-step row: 0.4)
    assert agreement_keep(outcome, P, MASK, 0.4, "min").tolist() == [False, True, True, False]
    # a fractional outcome: >= 0.5 is right
    half = torch.tensor([0.5, 0.49, 0.0, 0.0])
    assert agreement_keep(half, P, MASK, 0.5).tolist() == [True, True, True, True]


def test_agreement_keep_checks_outcome_shape() -> None:
    with pytest.raises(ValueError, match="outcome"):
        agreement_keep(torch.ones(3), P, MASK)


def test_min_form_credit_accepts_min_rewards() -> None:
    """End of the pipe: the `min_form` credit runs on the `min` shaping's step rewards and
    gives a right, clean response more advantage than a right one with a bad step."""
    step_end = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]], dtype=torch.float32)
    step_id = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    p = torch.tensor([[0.9, 0.9], [0.9, 0.1]])
    mask2 = torch.ones(2, 2)
    rewards = shape_step_rewards("min", p, mask2)
    inputs = CreditInputs(
        mask=torch.ones(2, 4),
        step_id=step_id,
        step_end=step_end,
        outcome=torch.tensor([1.0, 1.0]),
        group_size=2,
        step_scores=rewards,
        step_mask=mask2,
    )
    adv = CREDIT_ASSIGNERS.get("min_form")(inputs)
    assert float(adv[0, 0]) > float(adv[1, 0])
