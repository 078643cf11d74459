"""Test-time search with a process verifier: best-of-N, majority vote, step-level beam search.

PAV (Setlur et al. 2024) searches over reasoning steps with a process verifier: keep `W`
beams; expand each with `E` sampled next steps; score every candidate step by the base
policy's value after it plus `alpha` times the Best-of-K prover's advantage of the step,

    score = Q^pi(s_h) + alpha * (Q^mu(s_h) - Q^mu(s_{h-1})),   Q^mu = 1 - (1 - Q^pi)^K

and keep the best `W` (finished beams stay in the pool with their last score). The
baselines spend the same kind of compute on whole solutions: best-of-N keeps the sample
whose value after its last step is highest (the verifier read at the last token: an
outcome verifier), best-of-N by the minimum keeps the sample whose lowest step value is
highest (how step verifiers rank whole solutions: Math-Shepherd's and PURE's min; a PRM
trained only up to each solution's first error has never seen the steps after it, so its
value after the last step of a wrong solution means little), majority vote keeps the most
common final answer (no verifier).

`Q^pi` after each step comes from a `Scorer`: any reward head's `step_values` read at step
ends (`HeadScorer`; a PAV verifier gives its `Q^pi`, a `prm` head its step P(good)), the
same read from cached prefixes (`rl.eval.cached_scoring.CachedScorer`: each candidate's new
step on top of its beam's cached keys and values), or the built-in task's exact labels
(`ExactScorer`: 1 while every step is right, 0 from the first wrong one; the upper bound
of any verifier, at no cost). Compute is counted in policy tokens generated and, apart, in
tokens the verifier reads, in its own tokenizer (`Compute`), so strategies are compared at
matched compute. After each round beam search tells the scorer which beams it keeps
(`Scorer.retain`), so a cached scorer holds the caches of the live beams only.

Generation is batched over problems and beams (`Sampler`, transformers `generate`); a step
is sampled until the step delimiter or EOS. Runs in one process on the CPU or one GPU.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from rewards.heads import HeadBatch, RewardHead
from rl.algos.credit import batch_step_tensors
from rl.core.errors import ConfigError
from rl.rollout.backend import left_pad
from rl.rollout.steps import response_step_spans
from rl.tasks import arith

STRATEGIES: tuple[str, ...] = ("best_of_n", "best_of_n_min", "majority", "beam")
WHOLE_SOLUTION_STRATEGIES: tuple[str, ...] = ("best_of_n", "best_of_n_min", "majority")
"""The strategies `best_of_n_and_majority` answers from the same samples."""


@dataclass(frozen=True)
class Problem:
    """One prompt: the raw problem (what verifiers and the task read), the policy's input
    ids (chat template applied) and the reference answer."""

    prompt: str
    prompt_ids: list[int]
    answer: str


@dataclass
class Candidate:
    """A partial or finished solution of problem `problem`."""

    problem: int
    ids: list[int] = field(default_factory=list)
    """Response tokens so far (each step ends with the delimiter, the last one with EOS)."""
    values: list[float] = field(default_factory=list)
    """The scorer's Q^pi after each step."""
    score: float = 0.0
    finished: bool = False


@dataclass
class Compute:
    """Tokens spent: policy tokens generated, and tokens the verifier read (apart)."""

    generated_tokens: int = 0
    verifier_tokens: int = 0

    def add(self, other: Compute) -> None:
        self.generated_tokens += other.generated_tokens
        self.verifier_tokens += other.verifier_tokens


# ------------------------------------------------------------------------------- pure maths


def prover_values(q_pi: float, prover_k: int) -> float:
    """Q^mu of a Best-of-K prover: 1 - (1 - Q^pi)^K."""
    return 1.0 - (1.0 - q_pi) ** prover_k


def beam_score(q_after: float, q_before: float, alpha: float, prover_k: int) -> float:
    """`Q^pi(s_h) + alpha * (Q^mu(s_h) - Q^mu(s_{h-1}))` of a candidate step."""
    advantage = prover_values(q_after, prover_k) - prover_values(q_before, prover_k)
    return q_after + alpha * advantage


def keep_best(pool: Sequence[Candidate], width: int) -> list[Candidate]:
    """The `width` highest-scoring candidates (stable: earlier ones win ties)."""
    return sorted(pool, key=lambda c: -c.score)[:width]


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(completion: str) -> str | None:
    """The final answer of a completion, for majority vote: the built-in task's
    `Answer: N` line, else the last `\\boxed{...}`, else the last number; None if none."""
    answer = arith.extract_answer(completion)
    if answer is not None:
        return answer
    boxed = _BOXED.findall(completion)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def majority_index(answers: Sequence[str | None]) -> int:
    """Index of a sample with the most common non-None answer (the first such sample; 0
    when no sample has an answer)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return answers.index(winner)


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score (the first on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def beam_shape(budget: int, width: int | None) -> tuple[int, int]:
    """(beam width W, expansions per beam E) with W * E = `budget` samples per step; W
    defaults to the largest power of two with W * W <= budget. ConfigError when W does not
    fit the budget."""
    if budget < 1:
        raise ConfigError(f"--budgets: every budget must be >= 1, got {budget}")
    if width is None:
        width = 1
        while (2 * width) ** 2 <= budget:
            width *= 2
    if width < 1:
        raise ConfigError(f"--beam-width must be >= 1, got {width}")
    if width > budget:
        raise ConfigError(
            f"--beam-width {width} is larger than the candidates per step ({budget}): "
            "each beam needs at least one expansion"
        )
    return width, budget // width


# ------------------------------------------------------------------------------- scoring


class Scorer(Protocol):
    """Q^pi after each complete step of partial or finished responses."""

    def values(
        self, problems: Sequence[Problem], responses: Sequence[list[int]], keep: bool = True
    ) -> list[list[float]]:
        """One list per response: the value after each of its steps (a step is complete
        when it ends with the delimiter or EOS). Adds what it reads to `self.compute`.
        `keep`: the rows may be extended later (a cached scorer keeps their caches until
        `retain`); False for whole solutions that are only ranked."""
        ...

    def retain(self, problems: Sequence[Problem], responses: Sequence[list[int]]) -> None:
        """Keep what was cached for these rows (the beams that will be extended), drop the
        rest; nothing to do for a scorer without a cache."""
        ...

    compute: Compute


class ExactScorer:
    """The built-in task's exact labels: 1 after each step while every step is right, 0
    from the first wrong one on (no model, no verifier tokens)."""

    def __init__(self, tokenizer: Any, modulus: int, delimiter: str = "\n") -> None:
        self.tokenizer = tokenizer
        self.modulus = modulus
        self.delimiter = delimiter
        self.compute = Compute()

    def values(
        self, problems: Sequence[Problem], responses: Sequence[list[int]], keep: bool = True
    ) -> list[list[float]]:
        out = []
        for problem, ids in zip(problems, responses, strict=True):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            lines = [line.strip() for line in text.split(self.delimiter)]
            lines = [line for line in lines if line]
            expected = arith.step_lines(arith.parse_prompt(problem.prompt, self.modulus))
            right, values = True, []
            for i, line in enumerate(lines):
                right = right and i < len(expected) and line == expected[i]
                values.append(1.0 if right else 0.0)
            out.append(values)
        return out

    def retain(self, problems: Sequence[Problem], responses: Sequence[list[int]]) -> None:
        """Nothing is cached."""


def solutions_batch(
    problems: Sequence[Problem],
    responses: Sequence[list[int]],
    tokenizer: Any,
    pad_id: int,
    delimiter: str = "\n",
) -> HeadBatch:
    """Rows (problem i's prompt + response i) as a `HeadBatch` a reward head scores: prompts
    left padded [B, Tp], responses right padded [B, Tr], step ends by the trainer's rule."""
    prompt_ids, prompt_mask = left_pad([p.prompt_ids for p in problems], pad_id)  # [B, Tp]
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)  # [B, Tr]
    response_mask = torch.zeros((len(responses), width))
    for b, ids in enumerate(responses):
        response_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[b, : len(ids)] = 1.0
    spans = [response_step_spans(tokenizer, ids, delimiter) for ids in responses]
    step_end, step_id = batch_step_tensors(spans, width)
    return HeadBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),  # [B, Tp + Tr]
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_length=int(prompt_ids.shape[1]),
        step_id=step_id,
        step_end=step_end,
        completions=[tokenizer.decode(r, skip_special_tokens=True) for r in responses],
        group_size=1,
        prompts=[tokenizer.decode(p.prompt_ids) for p in problems],
        columns={
            "prompt": [p.prompt for p in problems],
            "answer": [p.answer for p in problems],
        },
    )


class HeadScorer:
    """A reward head's `step_values` read at step ends (a PAV verifier gives its Q^pi, a
    `prm` head its P(good)), every row read whole: the reference for `CachedScorer`
    (`rl.eval.cached_scoring`). Verifier tokens are the tokens the head's model reads, in its
    own tokenizer where the cached scorer knows the head (`reader_for`), else the policy's."""

    def __init__(
        self,
        head: RewardHead,
        tokenizer: Any,
        pad_id: int,
        delimiter: str = "\n",
        batch_size: int = 32,
        reader: Any = None,
    ) -> None:
        """`reader`: the head's `rl.eval.cached_scoring.Reader` (`reader_for(head, ...)`),
        which renders rows the way the head's model reads them, so verifier tokens are
        counted in its own tokenizer; None counts the policy's tokens."""
        if head.granularity == "outcome":
            raise ConfigError(
                f"--head {head.name}: an outcome head gives no step values; beam search "
                "needs a head that values every step (e.g. pav)"
            )
        self.head = head
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.delimiter = delimiter
        self.batch_size = batch_size
        self.compute = Compute()
        self.reader = reader

    def tokens_read(
        self, problems: Sequence[Problem], responses: Sequence[list[int]], batch: HeadBatch
    ) -> int:
        """Tokens the head's model reads for these rows (no padding)."""
        if self.reader is None:
            return int(batch.attention_mask.sum())
        return sum(len(r.ids) for r in self.reader.render(problems, responses))

    def head_batch(self, problems: Sequence[Problem], responses: Sequence[list[int]]) -> HeadBatch:
        """The rows as a `HeadBatch`, step ends by the trainer's rule."""
        return solutions_batch(problems, responses, self.tokenizer, self.pad_id, self.delimiter)

    def retain(self, problems: Sequence[Problem], responses: Sequence[list[int]]) -> None:
        """Nothing is cached between calls."""

    @torch.no_grad()
    def values(
        self, problems: Sequence[Problem], responses: Sequence[list[int]], keep: bool = True
    ) -> list[list[float]]:
        from rl.eval.prm import head_step_values

        out: list[list[float]] = []
        for start in range(0, len(responses), self.batch_size):
            rows = slice(start, start + self.batch_size)
            batch = self.head_batch(problems[rows], responses[rows])
            self.compute.verifier_tokens += self.tokens_read(problems[rows], responses[rows], batch)
            values, step_mask = head_step_values(self.head, batch)  # [B, H]
            counts = step_mask.sum(dim=1).long().tolist()
            out += [values[b, :n].tolist() for b, n in enumerate(counts)]
        return out


# ------------------------------------------------------------------------------- sampling


class Sampler:
    """Samples whole responses or single steps from a causal LM (transformers `generate`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stop_ids: Sequence[int],
        pad_id: int,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        delimiter: str = "\n",
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.delimiter = delimiter
        self.batch_size = batch_size
        self.compute = Compute()

    @torch.no_grad()
    def sample(
        self, contexts: Sequence[list[int]], n: int, one_step: bool, budget: int
    ) -> list[list[int]]:
        """`n` continuations of each context (context-major: context 0's n first), at most
        `budget` new tokens; `one_step` stops at the first delimiter. Each continuation keeps
        its stop token (delimiter or EOS) and no padding."""
        out: list[list[int]] = []
        per_call = max(1, self.batch_size // n)
        for start in range(0, len(contexts), per_call):
            ids, mask = left_pad(list(contexts[start : start + per_call]), self.pad_id)
            device = next(self.model.parameters()).device
            kwargs: dict[str, Any] = {}
            if one_step:
                kwargs = {"stop_strings": [self.delimiter], "tokenizer": self.tokenizer}
            generated = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=self.temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=budget,
                num_return_sequences=n,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **kwargs,
            )[:, ids.shape[1] :].cpu()
            out += [self._trim(row, one_step) for row in generated]
        self.compute.generated_tokens += sum(len(c) for c in out)
        return out

    def _trim(self, row: Tensor, one_step: bool) -> list[int]:
        """The tokens up to and including the first EOS or, for one step, the first token
        that contains the delimiter (a row that stopped early is padded after it)."""
        ids: list[int] = []
        for token in row.tolist():
            ids.append(token)
            if token in self.stop_ids:
                return ids
            if one_step and self.delimiter in self.tokenizer.decode([token]):
                return ids
        while ids and ids[-1] == self.pad_id:  # no stop token: budget used up
            ids.pop()
        return ids

    def finished(self, ids: list[int], used: int) -> bool:
        """A response is finished when it ended with EOS or has used the token budget."""
        return bool(ids) and ids[-1] in self.stop_ids or used >= self.max_new_tokens


# ------------------------------------------------------------------------------- strategies


@dataclass
class Outcome:
    """What one strategy chose: one completion per problem, and the compute it spent."""

    completions: list[str]
    compute: Compute


def whole_solutions(problems: Sequence[Problem], sampler: Sampler, n: int) -> list[list[list[int]]]:
    """`n` whole sampled responses per problem."""
    flat = sampler.sample(
        [p.prompt_ids for p in problems], n, one_step=False, budget=sampler.max_new_tokens
    )
    return [flat[i * n : (i + 1) * n] for i in range(len(problems))]


def best_of_n_and_majority(
    problems: Sequence[Problem], sampler: Sampler, scorer: Scorer, n: int
) -> dict[str, Outcome]:
    """Best-of-N (highest value after the last step), best-of-N by the minimum (highest
    lowest step value) and majority vote on the same `n` samples per problem (majority vote
    does not use the verifier)."""
    sampler.compute = Compute()
    samples = whole_solutions(problems, sampler, n)
    generated = sampler.compute.generated_tokens
    decode = sampler.tokenizer.decode
    texts = [[decode(s, skip_special_tokens=True) for s in group] for group in samples]
    flat_problems = [p for p, group in zip(problems, samples, strict=True) for _ in group]
    before = scorer.compute.verifier_tokens
    values = scorer.values(flat_problems, [s for group in samples for s in group], keep=False)
    scorer.retain([], [])
    read = scorer.compute.verifier_tokens - before
    best, lowest, vote = [], [], []
    for i, group in enumerate(texts):
        mine = values[i * n : (i + 1) * n]
        best.append(group[best_index([v[-1] if v else 0.0 for v in mine])])
        lowest.append(group[best_index([min(v) if v else 0.0 for v in mine])])
        vote.append(group[majority_index([final_answer(t) for t in group])])
    return {
        "best_of_n": Outcome(best, Compute(generated, read)),
        "best_of_n_min": Outcome(lowest, Compute(generated, read)),
        "majority": Outcome(vote, Compute(generated, 0)),
    }


def beam_search(
    problems: Sequence[Problem],
    sampler: Sampler,
    scorer: Scorer,
    width: int,
    expand: int,
    alpha: float,
    prover_k: int,
    max_steps: int,
) -> Outcome:
    """Step-level beam search (module docstring); returns the best finished beam per
    problem (the best beam of any kind if none finished)."""
    sampler.compute = Compute()
    before = scorer.compute.verifier_tokens
    beams = [[Candidate(problem=i)] for i in range(len(problems))]
    for _ in range(max_steps):
        active = [b for group in beams for b in group if not b.finished]
        if not active:
            break
        contexts = [problems[b.problem].prompt_ids + b.ids for b in active]
        budget = max(1, sampler.max_new_tokens - min(len(b.ids) for b in active))
        steps = sampler.sample(contexts, expand, one_step=True, budget=budget)
        children = []
        for k, step in enumerate(steps):
            parent = active[k // expand]
            ids = parent.ids + step
            done = sampler.finished(ids, len(ids)) or not step
            children.append(Candidate(parent.problem, ids, [], 0.0, done))
        values = scorer.values([problems[c.problem] for c in children], [c.ids for c in children])
        for k, (child, v) in enumerate(zip(children, values, strict=True)):
            parent = active[k // expand]
            q_before = parent.values[-1] if parent.values else 0.0
            child.values = v
            child.score = beam_score(v[-1], q_before, alpha, prover_k) if v else parent.score
        for i in range(len(problems)):
            pool = [b for b in beams[i] if b.finished] + [c for c in children if c.problem == i]
            beams[i] = keep_best(pool, width)
        growing = [b for group in beams for b in group if not b.finished]
        scorer.retain([problems[b.problem] for b in growing], [b.ids for b in growing])
    scorer.retain([], [])
    chosen = []
    for group in beams:
        finished = [b for b in group if b.finished] or group
        chosen.append(
            sampler.tokenizer.decode(keep_best(finished, 1)[0].ids, skip_special_tokens=True)
        )
    read = scorer.compute.verifier_tokens - before
    return Outcome(chosen, Compute(sampler.compute.generated_tokens, read))
