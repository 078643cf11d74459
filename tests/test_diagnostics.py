"""Credit diagnostics (`rl.trainer.diagnostics`) against hand-computed counts."""

from __future__ import annotations

import math

import pytest
import torch

from rl.algos.credit_specs import spec_for
from rl.config import load_config
from rl.core.errors import ConfigError
from rl.trainer.diagnostics import (
    SUM_NAMES,
    diagnostic_sums,
    diagnostics_row,
    step_mean_advantages,
)

# one group of 4 responses, 4 response tokens each (-1: off the response)
STEP_ID = torch.tensor([[0, 0, 1, 1], [0, 0, 1, -1], [0, 1, -1, -1], [0, 0, 1, 1]])
MASK = (STEP_ID >= 0).float()
FIRST_ERROR = torch.tensor([-1, 1, 0, -1])
OUTCOME = torch.tensor([1.0, 0.0, 0.0, 1.0])
# outcome-only advantage: +1 / -1 on every response token
OUTCOME_ADV = torch.tensor([1.0, -1.0, -1.0, 1.0]).unsqueeze(1) * MASK
# step credit: -1 on the tokens of the first wrong step, +1 on right steps of failed responses
EXTRA = torch.tensor(
    [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, -1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
)


def sums_of(advantages: torch.Tensor, outcome: torch.Tensor = OUTCOME) -> dict[str, float]:
    sums = diagnostic_sums(advantages, OUTCOME_ADV, MASK, STEP_ID, FIRST_ERROR, outcome, 4)
    return dict(zip(SUM_NAMES, sums.tolist(), strict=True))


def test_step_mean_advantages():
    adv = torch.tensor([[1.0, 3.0, 5.0, 9.0], [2.0, 4.0, 7.0, 100.0]])
    step_id = torch.tensor([[0, 0, 1, 1], [0, 0, 1, -1]])
    means, present = step_mean_advantages(adv, step_id, 3)
    assert means.tolist() == [[2.0, 7.0, 0.0], [3.0, 7.0, 0.0]]
    assert present.tolist() == [[True, True, False], [True, True, False]]


def test_step_credit_counts_by_hand():
    s = sums_of(OUTCOME_ADV + EXTRA)
    assert (s["groups"], s["zero_spread_groups"]) == (1, 0)
    # wrong steps: row 1 step 1 (-1 - 1) and row 2 step 0 (-1 - 1)
    assert (s["wrong_steps"], s["wrong_steps_negative"], s["wrong_steps_adv"]) == (2, 2, -4)
    assert s["wrong_steps_without_step_credit"] == 0  # both carry -1 of step credit
    # right steps: rows 0 and 3 both steps (+1), row 1 step 0 (-1 + 1 = 0, not negative)
    assert (s["right_steps"], s["right_steps_negative"], s["right_steps_adv"]) == (5, 0, 4)
    assert (s["right_steps_in_failed"], s["right_steps_in_failed_negative"]) == (1, 0)
    assert s["outcome_adv_sq"] == 13  # 4 + 3 + 2 + 4 response tokens, each 1^2
    assert s["step_adv_sq"] == 4
    row = diagnostics_row(list(s.values()))
    assert row["diag/wrong_step_adv_neg_frac"] == 1.0
    assert row["diag/wrong_step_adv_mean"] == -2.0
    assert row["diag/right_step_adv_mean"] == pytest.approx(0.8)
    assert row["diag/right_step_in_failed_adv_neg_frac"] == 0.0
    assert row["diag/step_credit_share"] == pytest.approx(4 / 17)
    assert row["diag/wrong_step_no_step_credit_frac"] == 0.0


def test_wrong_steps_without_step_credit():
    # row 1's first wrong step (step 1, token 2) loses its step credit; row 2's keeps -1
    extra = EXTRA.clone()
    extra[1, 2] = 0.0
    s = sums_of(OUTCOME_ADV + extra)
    assert (s["wrong_steps"], s["wrong_steps_without_step_credit"]) == (2, 1)
    # step credit below the tolerance counts as none
    extra = torch.zeros_like(EXTRA)
    extra[2, 0] = -1.0  # row 2's first wrong step keeps credit
    extra[1, 2] = 1e-8  # below the tolerance
    s = sums_of(OUTCOME_ADV + extra)
    assert s["wrong_steps_without_step_credit"] == 1
    assert diagnostics_row(list(s.values()))["diag/wrong_step_no_step_credit_frac"] == 0.5


def test_outcome_only_credit_pushes_down_right_steps_of_failed_responses():
    row = diagnostics_row(
        diagnostic_sums(OUTCOME_ADV, OUTCOME_ADV, MASK, STEP_ID, FIRST_ERROR, OUTCOME, 4)
    )
    assert row["diag/step_credit_share"] == 0.0
    assert row["diag/wrong_step_no_step_credit_frac"] == 1.0  # the outcome alone
    assert row["diag/right_step_in_failed_adv_neg_frac"] == 1.0
    assert row["diag/right_step_adv_neg_frac"] == pytest.approx(1 / 5)


def test_zero_spread_groups_and_empty_ratios_are_nan():
    all_right = torch.ones(4)
    s = sums_of(torch.zeros_like(MASK), outcome=all_right)
    assert s["zero_spread_groups"] == 1
    row = diagnostics_row(list(s.values()), with_share=False)
    assert row["diag/zero_spread_group_frac"] == 1.0
    assert math.isnan(row["diag/right_step_in_failed_adv_neg_frac"])  # no failed responses
    assert "diag/step_credit_share" not in row
    assert "diag/wrong_step_no_step_credit_frac" not in row  # gae: no outcome-only part


def test_credit_diagnostics_need_the_builtin_task():
    with pytest.raises(ConfigError, match="logging.credit_diagnostics"):
        load_config(
            "configs/quickstart.yaml",
            ["logging.credit_diagnostics=true", "data.train=data/arith_chat/train.jsonl"],
        )


def test_clean_count_ignores_right_by_chance_and_padding_rows():
    from types import SimpleNamespace

    from rl.tasks.arith import parse_prompt, step_lines
    from rl.trainer.diagnostics import CreditDiagnostics

    cfg = load_config("configs/quickstart.yaml", ["logging.credit_diagnostics=true"])
    diagnostics = CreditDiagnostics(cfg, tokenizer=None, credit=spec_for("outcome"))
    prompt = "3 +4 *2 -6"  # modulus 7: 3+4=0, 0*2=0, 0-6=1
    clean = "\n".join(step_lines(parse_prompt(prompt)))
    lucky = clean.replace("3+4=0", "3+4=5")  # a wrong step, the same answer line
    batch = SimpleNamespace(columns={"prompt": [prompt] * 3}, completions=[clean, lucky, clean])
    assert diagnostics.clean_count(batch, n_real=2) == 1.0  # row 2 pads the rank's share


@pytest.mark.parametrize(
    "credit, estimator",
    [
        ("prime", "rloo"),
        ("sum", "rloo"),
        ("min_form", "rloo"),
        ("outcome", "grpo"),
        ("pav", "grpo"),
    ],
)
def test_outcome_part_is_the_schemes_own(credit: str, estimator: str):
    """`A_out` is the outcome term the scheme adds: RLOO for the leave-one-out schemes (with
    GRPO's there, zero step rewards showed as about half the signal), else algo.advantage."""
    from rl.algos.advantages import ADVANTAGE_ESTIMATORS
    from rl.trainer.diagnostics import CreditDiagnostics

    cfg = load_config("configs/quickstart.yaml", ["logging.credit_diagnostics=true"])
    diagnostics = CreditDiagnostics(cfg, tokenizer=None, credit=spec_for(credit))
    assert diagnostics.estimator is ADVANTAGE_ESTIMATORS.get(estimator)
