"""Test-time search (`rl.eval.search`): the scoring maths, the selection rules, and beam
search / best-of-N driven by a scripted sampler and the task's exact labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from rl.core.errors import ConfigError
from rl.eval import search
from rl.tasks import arith


class CharTokenizer:
    """One token per character (id = code point); EOS is id 0."""

    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i != 0)


TOK = CharTokenizer()
PROMPT = "3 +4 *2 -6"  # modulus 7: 3+4=0, 0*2=0, 0-6=1
RIGHT = arith.step_lines(arith.parse_prompt(PROMPT))  # ['3+4=0', '0*2=0', '0-6=1', 'Answer: 1']
PROBLEM = search.Problem(PROMPT, TOK.encode(PROMPT), "1")


class ScriptedSampler(search.Sampler):
    """Steps: a wrong then a right candidate for every beam (expand 2); whole solutions:
    the given list, in turn."""

    def __init__(self, solutions: list[str] | None = None) -> None:
        super().__init__(None, TOK, [0], pad_id=0, max_new_tokens=64)
        self.solutions = solutions or []

    def sample(
        self, contexts: Sequence[list[int]], n: int, one_step: bool, budget: int
    ) -> list[list[int]]:
        out = []
        for context in contexts:
            done = TOK.decode(context[len(PROBLEM.prompt_ids) :]).count("\n")
            for k in range(n):
                if not one_step:
                    out.append(TOK.encode(self.solutions[k % len(self.solutions)]) + [0])
                    continue
                right = RIGHT[done]
                wrong = right[:-1] + str((int(right[-1]) + 1) % 7)
                line = wrong if k % 2 == 0 else right
                end = [0] if line.startswith("Answer") else TOK.encode("\n")
                out.append(TOK.encode(line) + end)
        self.compute.generated_tokens += sum(len(c) for c in out)
        return out


def exact() -> search.ExactScorer:
    return search.ExactScorer(TOK, modulus=7)


def test_prover_values_and_beam_score_by_hand() -> None:
    assert search.prover_values(0.25, 2) == pytest.approx(0.4375)
    assert search.prover_values(0.5, 1) == 0.5
    # Q^mu(0.5) - Q^mu(0.25) = 0.75 - 0.4375 = 0.3125; 0.5 + 0.5 * 0.3125
    assert search.beam_score(0.5, 0.25, alpha=0.5, prover_k=2) == pytest.approx(0.65625)
    assert search.beam_score(1.0, 1.0, alpha=2.0, prover_k=4) == 1.0


def test_selection_rules() -> None:
    pool = [search.Candidate(0, score=s) for s in (0.2, 0.9, 0.9, 0.5)]
    assert [c.score for c in search.keep_best(pool, 2)] == [0.9, 0.9]
    assert search.keep_best(pool, 2)[0] is pool[1]  # ties keep order
    assert search.best_index([0.1, 0.9, 0.9]) == 1
    assert search.majority_index(["1", "2", "2", None, "1"]) == 0  # tie: first seen wins
    assert search.majority_index(["3", None, "4", "4"]) == 2
    assert search.majority_index([None, None]) == 0
    assert search.final_answer("3+4=0\nAnswer: 1") == "1"
    assert search.final_answer("so \\boxed{12}.") == "12"
    assert search.final_answer("x 5 y 7") == "7"
    assert search.final_answer("none") is None


def test_beam_shape() -> None:
    assert [search.beam_shape(b, None) for b in (1, 2, 4, 8, 16)] == [
        (1, 1),
        (1, 2),
        (2, 2),
        (2, 4),
        (4, 4),
    ]
    assert search.beam_shape(8, 4) == (4, 2)
    with pytest.raises(ConfigError, match="--beam-width 8 is larger than the candidates"):
        search.beam_shape(4, 8)
    with pytest.raises(ConfigError, match="--budgets"):
        search.beam_shape(0, None)


def test_exact_scorer_values_partial_and_wrong_solutions() -> None:
    wrong = "3+4=0\n0*2=1\n0-6=1\nAnswer: 1"  # right answer by chance, step 1 wrong
    responses = [TOK.encode("3+4=0\n"), TOK.encode(wrong) + [0], []]
    values = exact().values([PROBLEM] * 3, responses)
    assert values == [[1.0], [1.0, 0.0, 0.0, 0.0], []]


def test_beam_search_follows_the_right_steps() -> None:
    sampler = ScriptedSampler()
    out = search.beam_search([PROBLEM], sampler, exact(), 1, 2, 0.5, 4, max_steps=10)
    assert out.completions == ["\n".join(RIGHT)]
    assert out.compute.verifier_tokens == 0  # exact labels read no model
    # 4 steps x 2 candidates (the wrong one as long as the right one), each its line plus
    # "\n" or EOS: 2 * (6 + 6 + 6 + 10)
    assert out.compute.generated_tokens == 56


def test_best_of_n_and_majority_pick_different_samples() -> None:
    clean = "\n".join(RIGHT)
    lucky = "3+4=5\n5*2=3\n3-6=1\nAnswer: 1"  # wrong steps, right answer
    wrong = "3+4=5\n5*2=3\n3-6=4\nAnswer: 4"
    sampler = ScriptedSampler([wrong, clean, wrong, lucky, wrong])
    out = search.best_of_n_and_majority([PROBLEM], sampler, exact(), 5)
    assert out["best_of_n"].completions == [clean]  # the only sample whose last step is right
    assert out["best_of_n_min"].completions == [clean]  # the only one with every step right
    assert out["majority"].completions == [wrong]  # answer 4 three times
    assert out["majority"].compute.verifier_tokens == 0
    assert out["majority"].compute.generated_tokens == out["best_of_n"].compute.generated_tokens


def test_search_benchmark_helpers_by_hand() -> None:
    """benchmarks/search_ranking.py's pairwise AUC and search_summary.py's Wilson interval."""
    from benchmarks.search_ranking import pair_auc
    from benchmarks.search_summary import wilson

    # (positive score, negative score): a win, a tie, a loss, a win -> (2 + 0.5) / 4
    assert pair_auc([(0.9, 0.1), (0.5, 0.5), (0.2, 0.3), (0.7, 0.6)]) == 0.625
    assert math.isnan(pair_auc([]))
    # p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.0025 + 1.96^2 / 40000) / 1.038416
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


def test_best_of_n_min_ranks_by_the_lowest_step_value() -> None:
    """A verifier whose value after the last step is high for a solution with a low step in
    the middle: best-of-N (last value) picks it, best-of-N by the minimum does not."""

    class Fixed:
        compute = search.Compute()

        def values(self, problems: Any, responses: Any, keep: bool = True) -> list[list[float]]:
            self.compute.verifier_tokens += 1
            return [[0.9, 0.1, 0.95], [0.7, 0.6, 0.8]]

        def retain(self, problems: Any, responses: Any) -> None:
            pass

    first, second = "1+1=2\n2+2=4\nAnswer: 4", "1+1=2\n2+2=5\nAnswer: 5"
    sampler = ScriptedSampler([first, second])
    out = search.best_of_n_and_majority([PROBLEM], sampler, Fixed(), 2)  # type: ignore[arg-type]
    assert out["best_of_n"].completions == [first]  # last values 0.95 > 0.8
    assert out["best_of_n_min"].completions == [second]  # minima 0.6 > 0.1
    assert out["best_of_n_min"].compute == out["best_of_n"].compute  # the same samples, read once


def test_launcher_default_strategies_are_all_strategies() -> None:
    from launch.search import DEFAULT_STRATEGIES

    assert DEFAULT_STRATEGIES.split(",") == list(search.STRATEGIES)
