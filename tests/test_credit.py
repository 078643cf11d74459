"""Hand-computed checks for per-step credit assignment: step spans, PAV, PRIME, min-form, sum."""

from __future__ import annotations

import pytest
import torch

from rl.algos.credit import (
    CREDIT_ASSIGNERS,
    CreditInputs,
    batch_step_tensors,
    min_form_step_rewards,
    pav_step_advantages,
    pav_step_advantages_batched,
    pav_token_advantages,
    prime_advantages,
    step_end_mask,
    step_ids_from_spans,
    step_spans_from_offsets,
    steps_to_tokens,
    sum_form_returns,
    tokens_to_steps,
)
from rl.core.errors import ConfigError

# ------------------------------------------------------------------------------------------
# step spans
# ------------------------------------------------------------------------------------------


def test_spans_tokens_straddling_the_delimiter() -> None:
    # text "ab.\n\ncd\nef": steps "ab." (chars 0-2), "cd" (5-6), "ef" (8-9)
    # tokens "ab" | ".\n\n" | "cd" | "\nef"
    #   ".\n\n": first non-delimiter char "." is in step 0 -> step 0
    #   "\nef":  first non-delimiter char "e" is in step 2 -> step 2
    text = "ab.\n\ncd\nef"
    offsets = [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert step_spans_from_offsets(text, offsets) == [(0, 1), (2, 2), (3, 3)]


def test_spans_delimiter_only_tokens_end_their_step() -> None:
    # "a" | "\n" | "\n" | "b" | EOS (0, 0): the newlines end step "a"; EOS joins step "b"
    assert step_spans_from_offsets("a\n\nb", [(0, 1), (1, 2), (2, 3), (3, 4), (0, 0)]) == [
        (0, 2),
        (3, 4),
    ]
    # a leading newline joins the first step
    assert step_spans_from_offsets("\na\nb", [(0, 1), (1, 2), (2, 3), (3, 4)]) == [(0, 2), (3, 3)]


def test_spans_no_delimiter_is_one_step_and_empty() -> None:
    assert step_spans_from_offsets("hello world", [(0, 5), (5, 6), (6, 11)]) == [(0, 2)]
    assert step_spans_from_offsets("\n\n", [(0, 1), (1, 2)]) == [(0, 1)]  # no step at all
    assert step_spans_from_offsets("", []) == []


def test_spans_blank_segments_and_multichar_delimiter() -> None:
    # "a\n \nb": the whitespace-only segment " " is not a step by default
    assert step_spans_from_offsets("a\n \nb", [(0, 1), (1, 4), (4, 5)]) == [(0, 1), (2, 2)]
    offsets = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # a | \n | " " | \n | b
    assert step_spans_from_offsets("a\n \nb", offsets, skip_blank=False) == [
        (0, 1),
        (2, 3),
        (4, 4),
    ]
    # delimiter "\n\n": "x\ny" is one step; "z" another
    assert step_spans_from_offsets("x\ny\n\nz", [(0, 2), (2, 5), (5, 6)], delimiter="\n\n") == [
        (0, 1),
        (2, 2),
    ]


def test_spans_step_without_own_token_is_merged() -> None:
    # token "a\nb" starts in step "a" and swallows all of step "b"; the "\n" after it ends it
    assert step_spans_from_offsets("a\nb\n", [(0, 3), (3, 4)]) == [(0, 1)]


def test_spans_bad_offsets() -> None:
    with pytest.raises(ValueError, match="relative to the response"):
        step_spans_from_offsets("ab", [(0, 1), (1, 9)])
    with pytest.raises(ValueError, match="backwards"):
        step_spans_from_offsets("a\nb", [(2, 3), (0, 1)])


def _bpe_pieces(vocab_size: int, text: str) -> tuple[list[str], list[tuple[int, int]]]:
    from tokenizers import Tokenizer, models, trainers

    # no pre-tokenizer: the whole string is one "word", so BPE merges run across "\n"
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    corpus = ["Add 2.\n\nThen 3.\nThe sum is 5.\n", "Add 4.\n\nThen 1.\nThe sum is 5.\n"] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    offsets = tok.encode(text).offsets
    pieces = [text[s:e] for s, e in offsets]
    assert "".join(pieces) == text
    return pieces, offsets


@pytest.mark.parametrize("vocab_size", [30, 80])
def test_spans_with_a_trained_bpe_tokenizer(vocab_size: int) -> None:
    text = "Add 2.\n\nThen 1.\nThe sum is 3."
    pieces, offsets = _bpe_pieces(vocab_size, text)
    assert any("\n" in p and p.strip("\n") for p in pieces), pieces  # a real cross-"\n" merge
    spans = step_spans_from_offsets(text, offsets)
    if vocab_size == 30:
        # pieces: Ad|d |2|.\n|\nThe|n |1|.\n|The| s|u|m i|s| |3|.   (".\n" stays in its step,
        # "\nThe" starts the next one)
        steps = ["".join(pieces[a : b + 1]) for a, b in spans]
        assert steps == ["Add 2.\n", "\nThen 1.\n", "The sum is 3."]
    # generic check against rule 1 computed independently (no token here is only newlines;
    # at vocab 80 tokens like "Add 2.\n\nThen " run across steps): the token's step is the
    # count of non-empty lines before its first non-newline character, renumbered 0, 1, ...
    # in order of appearance (rule 3: a step that owns no token has no span)
    text_steps = []
    for piece, (start, _) in zip(pieces, offsets, strict=True):
        first = start + len(piece) - len(piece.lstrip("\n"))
        assert first < start + len(piece)
        text_steps.append(sum(1 for line in text[:first].split("\n")[:-1] if line))
    renumber = {s: i for i, s in enumerate(dict.fromkeys(text_steps))}
    expected = [renumber[s] for s in text_steps]
    assert step_ids_from_spans(spans, len(pieces)).tolist() == expected


def test_step_end_and_ids() -> None:
    spans = [(0, 1), (2, 2), (3, 5)]
    torch.testing.assert_close(step_end_mask(spans, 8), torch.tensor([0.0, 1, 1, 0, 0, 1, 0, 0]))
    assert step_ids_from_spans(spans, 8).tolist() == [0, 0, 1, 2, 2, 2, -1, -1]
    ends, ids = batch_step_tensors([spans, [(0, 2)]], 8)
    assert ends.shape == (2, 8) and ids.dtype == torch.long
    assert ends[1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert ids[1].tolist() == [0, 0, 0, -1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="does not fit"):
        step_end_mask([(0, 8)], 8)


def test_tokens_steps_round_trip() -> None:
    step_end = torch.tensor([[0.0, 1, 0, 1, 0], [1.0, 0, 0, 0, 0]])
    tv = torch.tensor([[9.0, 0.3, 9, 0.7, 9], [0.5, 9, 9, 9, 9]])
    values, smask = tokens_to_steps(tv, step_end)
    torch.testing.assert_close(values, torch.tensor([[0.3, 0.7], [0.5, 0.0]]))
    torch.testing.assert_close(smask, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    back = steps_to_tokens(values, step_end)
    torch.testing.assert_close(back, torch.tensor([[0.0, 0.3, 0, 0.7, 0], [0.5, 0, 0, 0, 0]]))


# ------------------------------------------------------------------------------------------
# PAV
# ------------------------------------------------------------------------------------------


def test_pav_step_advantages_by_hand() -> None:
    # Q^pi = [0.2, 0.5, 0.5, 1.0], K = 4: Q^mu = 1 - (1 - Q^pi)^4
    #   = [1 - 0.4096, 1 - 0.0625, 1 - 0.0625, 1 - 0] = [0.5904, 0.9375, 0.9375, 1.0]
    #   A = diff = [0.3471, 0.0, 0.0625]
    adv = pav_step_advantages(torch.tensor([0.2, 0.5, 0.5, 1.0], dtype=torch.float64), 4)
    torch.testing.assert_close(adv, torch.tensor([0.3471, 0.0, 0.0625], dtype=torch.float64))
    # K = 1 (mu = pi): plain differences of Q^pi
    torch.testing.assert_close(
        pav_step_advantages(torch.tensor([0.2, 0.5]), 1), torch.tensor([0.3])
    )
    with pytest.raises(ConfigError, match="prover_k"):
        pav_step_advantages(torch.tensor([0.2, 0.5]), 0)


def test_pav_batched_matches_loop_and_masks() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.rand(4, 6, generator=g, dtype=torch.float64)  # [B, H+1], H = 5
    n_steps = [5, 3, 1, 0]
    smask = (torch.arange(5).unsqueeze(0) < torch.tensor(n_steps).unsqueeze(1)).float()
    got = pav_step_advantages_batched(q, smask, 4)
    for b, n in enumerate(n_steps):
        torch.testing.assert_close(got[b, :n], pav_step_advantages(q[b, : n + 1], 4))
        assert got[b, n:].abs().sum() == 0
    with pytest.raises(ValueError, match="prefix"):
        pav_step_advantages_batched(q[:1], torch.tensor([[1.0, 0, 1, 0, 0]]), 4)


def test_pav_token_advantages_by_hand() -> None:
    # steps: tokens {0,1} -> 0, {2,3} -> 1, {4} -> 2, token 5 off-response
    # A^mu on the step ends (tokens 1, 3, 4) = [0.3471, 0.0, 0.0625]; outcome_adv 0.5, alpha 0.5
    #   step 0: 0.5 + 0.5 * 0.3471 = 0.67355; step 1: 0.5; step 2: 0.5 + 0.03125 = 0.53125
    step_id = torch.tensor([[0, 0, 1, 1, 2, -1], [0, 0, 0, -1, -1, -1]])
    step_adv = torch.tensor([[0.0, 0.3471, 0, 0, 0.0625, 0], [0.0, 0, -0.2, 0, 0, 0]])
    adv = pav_token_advantages(torch.tensor([0.5, -1.0]), step_adv, step_id, alpha=0.5)
    # row 1: one step, A = -0.2: -1 + 0.5 * -0.2 = -1.1
    expected = torch.tensor(
        [[0.67355, 0.67355, 0.5, 0.5, 0.53125, 0.0], [-1.1, -1.1, -1.1, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(adv, expected)


def test_pav_token_advantages_matches_loop() -> None:
    g = torch.Generator().manual_seed(1)
    b, t = 3, 12
    spans = [[(0, 3), (4, 4), (5, 10)], [(0, 11)], [(0, 1), (2, 5)]]
    step_end, step_id = batch_step_tensors(spans, t)
    step_vals = torch.randn(b, 3, generator=g, dtype=torch.float64)
    outcome_adv = torch.randn(b, generator=g, dtype=torch.float64)
    got = pav_token_advantages(outcome_adv, steps_to_tokens(step_vals, step_end), step_id, 0.3)
    for i in range(b):
        for tok in range(t):
            h = int(step_id[i, tok])
            want = 0.0 if h < 0 else float(outcome_adv[i] + 0.3 * step_vals[i, h])
            assert got[i, tok].item() == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------------------
# returns, PRIME
# ------------------------------------------------------------------------------------------


def test_sum_form_returns_by_hand_and_loop() -> None:
    # r = [1, 0, 2, 5(masked)], gamma 0.5: R2 = 2, R1 = 0 + 0.5*2 = 1, R0 = 1 + 0.5*1 = 1.5
    r = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(sum_form_returns(r, m, 0.5), torch.tensor([[1.5, 1.0, 2.0, 0.0]]))
    torch.testing.assert_close(sum_form_returns(r, m), torch.tensor([[3.0, 2.0, 2.0, 0.0]]))
    g = torch.Generator().manual_seed(2)
    r = torch.randn(3, 7, generator=g, dtype=torch.float64)
    m = (torch.arange(7).unsqueeze(0) < torch.tensor([[7], [4], [1]])).double()
    for gamma in (1.0, 0.9):
        got = sum_form_returns(r, m, gamma)
        for b in range(3):
            for t in range(7):
                want = sum(gamma ** (s - t) * r[b, s] * m[b, s] for s in range(t, 7)) * m[b, t]
                assert got[b, t].item() == pytest.approx(float(want), abs=1e-12)


# group of K = 2:
#   row 0: mask [1,1,1,1], step ends at t = 1, 3, rewards [0, 0.2, 0, 0.4] -> r_phi = 0.6
#   row 1: mask [1,1,1,0], step end at t = 2,    rewards [0, 0, -0.2, 0]  -> r_phi = -0.2
#   outcome [1, 0] -> outcome RLOO [+1, -1]; process baselines b0 = -0.2, b1 = 0.6
PRIME_R = torch.tensor([[0.0, 0.2, 0.0, 0.4], [0.0, 0.0, -0.2, 0.0]])
PRIME_M = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 0]])
PRIME_END = torch.tensor([[0.0, 1, 0, 1], [0.0, 0, 1, 0]])
PRIME_O = torch.tensor([1.0, 0.0])


def test_prime_per_step_by_hand() -> None:
    # row 0: d = [0, 0.2 + 0.2, 0, 0.4 + 0.2] = [0, 0.4, 0, 0.6]; returns [1.0, 1.0, 0.6, 0.6]; +1
    # row 1: d = [0, 0, -0.2 - 0.6, 0]; returns [-0.8, -0.8, -0.8, 0]; -1 on response tokens
    adv = prime_advantages(PRIME_R, PRIME_M, PRIME_O, 2, step_end=PRIME_END)
    expected = torch.tensor([[2.0, 2.0, 1.6, 1.6], [-1.8, -1.8, -1.8, 0.0]])
    torch.testing.assert_close(adv, expected)
    # gamma 0.5, process_coef 2, outcome_coef 0.5 on row 0: returns of [0, 0.4, 0, 0.6] are
    #   t3 0.6, t2 0.3, t1 0.4 + 0.15 = 0.55, t0 0.275 -> 2 * [.275, .55, .3, .6] + 0.5
    adv = prime_advantages(PRIME_R, PRIME_M, PRIME_O, 2, 0.5, 2.0, 0.5, step_end=PRIME_END)
    torch.testing.assert_close(adv[0], torch.tensor([1.05, 1.6, 1.1, 1.7]))
    with pytest.raises(ValueError, match="step_end"):
        prime_advantages(PRIME_R, PRIME_M, PRIME_O, 2)


def test_prime_last_token_and_per_token_mean_by_hand() -> None:
    # last_token: row 0 d = [0, 0.2, 0, 0.4 + 0.2] -> returns [0.8, 0.8, 0.6, 0.6] + 1
    #             row 1 (last token t = 2) d = [0, 0, -0.2 - 0.6, 0] -> [-0.8]*3 - 1
    adv = prime_advantages(PRIME_R, PRIME_M, PRIME_O, 2, baseline="last_token")
    torch.testing.assert_close(adv, torch.tensor([[1.8, 1.8, 1.6, 1.6], [-1.8, -1.8, -1.8, 0.0]]))
    # per_token_mean: per-token means 0.6/4 = 0.15 and -0.2/3; b0 = -1/15, b1 = 0.15
    #   row 0 d = r + 1/15 on 4 tokens -> returns t3 .4667, t2 .5333, t1 .8, t0 .8667; + 1
    #   row 1 d = [-.15, -.15, -.35] -> returns [-.65, -.5, -.35]; - 1
    adv = prime_advantages(PRIME_R, PRIME_M, PRIME_O, 2, baseline="per_token_mean")
    c = 1 / 15
    row0 = [0.6 + 4 * c, 0.6 + 3 * c, 0.4 + 2 * c, 0.4 + c]
    expected = torch.tensor([[x + 1 for x in row0], [-1.65, -1.5, -1.35, 0.0]])
    torch.testing.assert_close(adv, expected)
    with pytest.raises(ConfigError, match="baseline"):
        prime_advantages(PRIME_R, PRIME_M, PRIME_O, 2, baseline="median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 2"):
        prime_advantages(PRIME_R, PRIME_M, PRIME_O, 1, baseline="last_token")


def test_prime_per_step_matches_eq5_loop() -> None:
    g = torch.Generator().manual_seed(3)
    p, k, t, gamma = 2, 3, 6, 0.9
    b = p * k
    lengths = torch.tensor([6, 4, 2, 5, 6, 1])
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).double()  # [B, T]
    step_end = (torch.rand(b, t, generator=g) < 0.4).double() * mask
    step_end[torch.arange(b), lengths - 1] = 1.0  # the last token always ends a step
    r = torch.randn(b, t, generator=g, dtype=torch.float64) * step_end
    outcome = torch.randint(0, 2, (b,), generator=g).double()
    got = prime_advantages(r, mask, outcome, k, gamma, 1.5, 0.7, step_end=step_end)
    for i in range(b):
        group = range((i // k) * k, (i // k) * k + k)
        others = [j for j in group if j != i]
        base = sum(float(r[j].sum()) for j in others) / (k - 1)
        o_adv = float(outcome[i]) - sum(float(outcome[j]) for j in others) / (k - 1)
        for tt in range(int(lengths[i])):
            ret = sum(
                gamma ** (s - tt) * (float(r[i, s]) - base * float(step_end[i, s]))
                for s in range(tt, int(lengths[i]))
            )
            assert got[i, tt].item() == pytest.approx(1.5 * ret + 0.7 * o_adv, abs=1e-10)
        assert got[i, int(lengths[i]) :].abs().sum() == 0


# ------------------------------------------------------------------------------------------
# min-form
# ------------------------------------------------------------------------------------------


def test_min_form_by_hand() -> None:
    # PR = [0.5, -1.0, 0.2], T = 1: -PR/T = [-0.5, 1.0, -0.2]; exp = [0.60653, 2.71828, 0.81873]
    # w = exp / 4.14354 = [0.14638, 0.65603, 0.19759]; w * PR = [0.07319, -0.65603, 0.03952]
    # row 1 has 2 valid steps [3, 3] -> w = [0.5, 0.5] -> [1.5, 1.5, 0]; row 2 no valid step -> 0
    pr = torch.tensor([[0.5, -1.0, 0.2], [3.0, 3.0, 7.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    smask = torch.tensor([[1.0, 1, 1], [1.0, 1, 0], [0.0, 0, 0]], dtype=torch.float64)
    got = min_form_step_rewards(pr, smask, temperature=1.0)
    expected = torch.tensor(
        [[0.0731899, -0.6560283, 0.0395184], [1.5, 1.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="temperature"):
        min_form_step_rewards(pr, smask, temperature=0.0)


def test_min_form_tends_to_min_as_temperature_drops() -> None:
    g = torch.Generator().manual_seed(4)
    pr = torch.rand(5, 6, generator=g, dtype=torch.float64)
    smask = (torch.arange(6).unsqueeze(0) < torch.tensor([[6], [5], [3], [2], [1]])).double()
    masked_min = pr.masked_fill(smask == 0, float("inf")).min(dim=1).values
    gaps = []
    for temp in (1.0, 0.1, 1e-4):
        total = min_form_step_rewards(pr, smask, temp).sum(dim=1)
        gaps.append((total - masked_min).abs().max().item())
        assert (total >= masked_min - 1e-12).all()  # a weighted mean of PR is >= the min
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------


def _inputs() -> CreditInputs:
    # one prompt, K = 2; row 0: steps {0,1}, {2}; row 1: one step {0,1,2}; T = 4
    step_end, step_id = batch_step_tensors([[(0, 1), (2, 2)], [(0, 2)]], 4)
    return CreditInputs(
        mask=torch.tensor([[1.0, 1, 1, 0], [1.0, 1, 1, 0]]),
        step_id=step_id,
        step_end=step_end,
        outcome=torch.tensor([1.0, 0.0]),
        group_size=2,
        step_scores=torch.tensor([[0.5, 1.0], [0.2, 0.0]]),
        step_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    )


def test_registry_names_and_pav() -> None:
    assert CREDIT_ASSIGNERS.names() == ["min_form", "pav", "prime", "sum"]
    # outcome RLOO [+1, -1]; row 0 Q^pi [0.2, 0.5, 1.0] K=4 -> A^mu [0.3471, 0.0625]
    # row 1 Q^pi [0.2, 0.2] -> A^mu [0]; alpha 0.5
    inputs = _inputs()
    q_pi = torch.tensor([[0.2, 0.5, 1.0], [0.2, 0.2, 0.0]])
    inputs.step_scores = pav_step_advantages_batched(q_pi, inputs.step_mask, prover_k=4)
    torch.testing.assert_close(inputs.step_scores, torch.tensor([[0.3471, 0.0625], [0.0, 0.0]]))
    adv = CREDIT_ASSIGNERS.get("pav")(inputs, alpha=0.5)
    expected = torch.tensor([[1.17355, 1.17355, 1.03125, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_registry_sum_prime_min_form() -> None:
    # sum: rewards row 0 on t1 = 0.5, t2 = 1.0 (r_phi 1.5); row 1 on t2 = 0.2 (r_phi 0.2)
    #   last-token baselines b0 = 0.2, b1 = 1.5
    #   row 0 returns [1.5, 1.5, 1.0] - 0.2 + 1 = [2.3, 2.3, 1.8]
    #   row 1 returns [0.2, 0.2, 0.2] - 1.5 - 1 = [-2.3, -2.3, -2.3]
    adv = CREDIT_ASSIGNERS.get("sum")(_inputs())
    torch.testing.assert_close(adv, torch.tensor([[2.3, 2.3, 1.8, 0.0], [-2.3, -2.3, -2.3, 0.0]]))
    # prime (per_step): row 0 subtracts 0.2 on two step ends: [1.5 - 0.4, 1.1, 0.8] + 1
    #   row 1 subtracts 1.5 once: [-1.3] * 3 - 1
    adv = CREDIT_ASSIGNERS.get("prime")(_inputs())
    torch.testing.assert_close(adv, torch.tensor([[2.1, 2.1, 1.8, 0.0], [-2.3, -2.3, -2.3, 0.0]]))
    # min_form at tiny T: row 0 step rewards -> [0.5, 0] (all weight on the min), row 1 [0.2]
    #   baselines b0 = 0.2, b1 = 0.5: row 0 [0.5, 0, 0] cumulated [0.5, 0.5, 0] - 0.2 + 1
    adv = CREDIT_ASSIGNERS.get("min_form")(_inputs(), temperature=1e-4)
    torch.testing.assert_close(adv, torch.tensor([[1.3, 1.3, 0.8, 0.0], [-1.3, -1.3, -1.3, 0.0]]))
