"""The `prm` reward head on hand-built batches with tiny locally built PRMs (fast, one process).

The cross-tokenizer case: the policy is `arith-tiny` (character tokenizer), the PRM reads with
the shipped `chat-tiny` byte-level BPE tokenizer plus a `<step>` tag; step h's score must land
on the policy's step-h end token and equal `step_probabilities` on the re-rendered text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from rewards.heads import HeadContext, HeadOutput, RewardHead, checked_score
from rl.algos.losses import policy_loss
from rl.algos.prm_shaping import ShapingParams, agreement_keep, shape_step_rewards
from rl.core.errors import ConfigError, RewardError
from rl.core.types import HeadBatch, RolloutBatch
from rl.engine.start_model import build_tokenizer, prompt_text
from rl.prm.convention import PRMConvention, save_convention
from rl.prm.model import load_prm, step_probabilities
from rl.rollout.steps import head_batch
from rl.trainer.rewards import drop_rows
from tests.models import build_prm, chat_tokenizer

PROBLEMS = ["3+4*2", "2+3", "1+1+2", "5*5"]
RESPONSES = [
    "3+4=7\n7*2=14\nAnswer: 14",  # three steps
    "Answer: 5",  # one step, no delimiter
    "1+1=2\n\n2+2=4\n",  # a blank segment and a trailing delimiter: two steps
    "5*5=25\nAnswer: 25",  # truncated below: no step at all
]
STEPS = [["3+4=7", "7*2=14", "Answer: 14"], ["Answer: 5"], ["1+1=2", "2+2=4"], []]


def policy_batch(tok: Any, truncate_last: bool = True) -> HeadBatch:
    """The arith-tiny policy's rollouts of RESPONSES, steps cut as the trainer cuts them."""
    prompts = [prompt_text(tok, p) for p in PROBLEMS]
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    tp, tr = max(map(len, p_ids)), max(map(len, r_ids))
    b = len(PROBLEMS)
    input_ids = torch.full((b, tp + tr), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((b, tp + tr), dtype=torch.long)
    response_mask = torch.zeros((b, tr))
    for i, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
        input_ids[i, tp - len(p) : tp] = torch.tensor(p)
        input_ids[i, tp : tp + len(r)] = torch.tensor(r)
        attention[i, tp - len(p) : tp + len(r)] = 1
        response_mask[i, : len(r)] = 1.0
    if truncate_last:  # as rollout.mask_truncated leaves a truncated row
        response_mask[-1] = 0.0
    rollouts = RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        prompt_length=tp,
        prompts=prompts,
        completions=list(RESPONSES),
        columns={"prompt": list(PROBLEMS), "answer": ["14", "5", "4", "25"]},
        group_size=2,
    )
    return head_batch(tok, rollouts, "\n")


def context(tokenizer: Any, verifier: Any = None) -> HeadContext:
    return HeadContext(
        cfg=None,
        dist=None,
        tokenizer=tokenizer,
        policy_path="",
        ds_config={},
        micro_batch_size=3,
        local_batch_size=len(PROBLEMS),
        verifier=verifier,
    )


def make_head(path: Path, policy_tok: Any, verifier: Any = None, **kwargs: Any) -> Any:
    from rewards.build import resolve_head

    head = resolve_head("prm", {"path": str(path), **kwargs})
    head.setup(context(policy_tok, verifier))
    return head


def expected_probs(path: Path, overrides: dict[str, Any] | None = None) -> list[list[float]]:
    """`step_probabilities` of the PRM on the raw problems and the hand-written steps, one
    solution at a time (no padding)."""
    model, tok = load_prm(path, overrides=overrides)
    return [
        step_probabilities(model, tok, [p], [s])[0] for p, s in zip(PROBLEMS, STEPS, strict=True)
    ]


@pytest.fixture(scope="module")
def policy_tok() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_prm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prm") / "chat_prm"
    return build_prm(out, chat_tokenizer(), step_tag="<step>", prompt_format="plain")


def test_step_texts_follow_the_trainers_steps(chat_prm: Path, policy_tok: Any) -> None:
    batch = policy_batch(policy_tok)
    assert batch.step_end.sum(dim=1).tolist() == [3, 1, 2, 0]
    head = make_head(chat_prm, policy_tok)
    problems, steps = head.step_texts(batch)
    assert problems == PROBLEMS  # the raw problems, not the chat-templated prompts
    assert steps == STEPS


def test_step_texts_read_the_host_once_per_batch(chat_prm: Path, policy_tok: Any) -> None:
    """The step texts read each tensor of the batch once, not once per row, and a batch
    twice as long gives each row the same texts."""
    from tests.host_reads import counted_host_reads

    batch = policy_batch(policy_tok)
    double = batch.select(list(range(len(PROBLEMS))) * 2)
    head = make_head(chat_prm, policy_tok)
    counts, texts = [], []
    for b in (batch, double):
        with counted_host_reads() as reads:
            texts.append(head.step_texts(b)[1])
        counts.append(len(reads))
    assert counts[0] == counts[1], counts
    assert texts == [STEPS, STEPS + STEPS]


def test_cross_tokenizer_scores_land_on_policy_step_ends(chat_prm: Path, policy_tok: Any) -> None:
    _, prm_tok = load_prm(chat_prm)
    assert prm_tok.get_vocab() != policy_tok.get_vocab()  # really another tokenizer
    batch = policy_batch(policy_tok)
    head = make_head(chat_prm, policy_tok, shaping="prob")
    out = checked_score(head, batch)
    want = expected_probs(chat_prm)
    for b, probs in enumerate(want):
        ends = batch.step_end[b].nonzero().flatten()
        assert len(ends) == len(probs)
        torch.testing.assert_close(
            out.token_rewards[b, ends], torch.tensor(probs), atol=1e-5, rtol=0
        )
        off = torch.ones_like(out.token_rewards[b], dtype=torch.bool)
        off[ends] = False
        assert bool((out.token_rewards[b, off] == 0).all())
    assert out.keep is None
    flat = [p for row in want for p in row]
    assert out.metrics["p_mean"] == pytest.approx(sum(flat) / len(flat), abs=1e-5)
    assert out.metrics["steps_per_response"] == pytest.approx(6 / 4)
    below = sum(p < 0.5 for p in flat) / len(flat)
    assert out.metrics["below_threshold_frac"] == pytest.approx(below)
    assert out.metrics["filtered_frac"] == 0.0


@pytest.mark.parametrize("shaping", ["min", "clip", "delta", "first_error"])
def test_each_shaping_on_step_ends(chat_prm: Path, policy_tok: Any, shaping: str) -> None:
    batch = policy_batch(policy_tok)
    kwargs = {"eta": 0.6, "threshold": 0.55, "penalty": 2.0}
    head = make_head(chat_prm, policy_tok, shaping=shaping, **kwargs)
    out = checked_score(head, batch)
    p, mask = head.step_probs(batch)
    want = shape_step_rewards(shaping, p, mask, ShapingParams(**kwargs))  # [B, H]
    got = out.token_rewards[batch.step_end.bool()]
    torch.testing.assert_close(got, want[mask.bool()], atol=1e-6, rtol=0)


def test_default_credit_follows_the_shaping(chat_prm: Path) -> None:
    from rewards.build import resolve_head

    credits = {
        s: resolve_head("prm", {"path": str(chat_prm), "shaping": s}).default_credit
        for s in ("prob", "min", "clip", "delta", "first_error")
    }
    assert credits == {
        "prob": "pav",
        "min": "min_form",
        "clip": "pav",
        "delta": "sum",
        "first_error": "pav",
    }


def test_step_values_are_p_on_each_steps_tokens(chat_prm: Path, policy_tok: Any) -> None:
    batch = policy_batch(policy_tok)
    head = make_head(chat_prm, policy_tok)
    values = head.step_values(batch)
    want = expected_probs(chat_prm)
    for b, probs in enumerate(want):
        for h, p in enumerate(probs):
            on = batch.step_id[b] == h
            torch.testing.assert_close(
                values[b, on], torch.full((int(on.sum()),), p), atol=1e-5, rtol=0
            )
        assert bool((values[b, batch.step_id[b] < 0] == 0).all())


def test_two_class_prm_with_chat_prompt_override(tmp_path: Path, policy_tok: Any) -> None:
    """A `two_class` PRM saved with a plain prompt format, read with `prompt_format: chat`
    from the head's options: the head uses the overridden convention."""
    tok = chat_tokenizer()
    path = build_prm(tmp_path / "p", tok, step_tag="<step>", head="two_class")
    batch = policy_batch(policy_tok)
    head = make_head(path, policy_tok, shaping="prob", prompt_format="chat")
    assert head.convention.prompt_format == "chat"
    out = checked_score(head, batch)
    want = expected_probs(path, {"prompt_format": "chat"})
    plain = expected_probs(path)
    assert want != plain  # the prompt format changes what the PRM reads
    got = [out.token_rewards[b, batch.step_end[b].bool()].tolist() for b in range(4)]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-5)


def test_off_the_shelf_prm_with_step_tag_option(tmp_path: Path, policy_tok: Any) -> None:
    """A PRM directory without a saved convention loads when the options give the tag."""
    tok = chat_tokenizer()
    path = build_prm(tmp_path / "p", tok, step_tag="<step>")
    (path / "prm_convention.json").unlink()
    with pytest.raises(ConfigError, match="step_tag"):
        make_head(path, policy_tok)
    head = make_head(path, policy_tok, step_tag="<step>", shaping="prob")
    out = checked_score(head, policy_batch(policy_tok))
    first = out.token_rewards[0, policy_batch(policy_tok).step_end[0].bool()]
    assert first.tolist() == pytest.approx(
        expected_probs(path, {"step_tag": "<step>"})[0], abs=1e-5
    )


def test_agreement_filter_drops_disagreeing_rows(chat_prm: Path, policy_tok: Any) -> None:
    batch = policy_batch(policy_tok)
    plain = make_head(chat_prm, policy_tok, shaping="prob")
    p, mask = plain.step_probs(batch)
    mean = (p * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B]
    threshold = float(mean[:3].median())
    prm_right = mean >= threshold
    # outcomes agree with the PRM on rows 0 and 2, disagree on row 1; row 3 has no step
    outcome = torch.tensor([float(prm_right[0]), float(~prm_right[1]), float(prm_right[2]), 0.0])
    calls: list[int] = []

    def verifier(
        prompts: list[str], completions: list[str], columns: dict[str, Any]
    ) -> torch.Tensor:
        calls.append(len(prompts))
        return outcome

    head = make_head(
        chat_prm, policy_tok, verifier, agreement_filter=True, threshold=threshold, shaping="prob"
    )
    out = checked_score(head, batch)
    assert calls == [4]
    assert out.keep is not None
    assert out.keep.tolist() == [True, False, True, True]
    assert out.keep.tolist() == agreement_keep(outcome, p, mask, threshold).tolist()
    assert out.metrics["filtered_frac"] == pytest.approx(0.25)
    # the filter does not change the step rewards themselves
    torch.testing.assert_close(out.token_rewards, checked_score(plain, batch).token_rewards)


def test_agreement_filter_needs_the_verifier(chat_prm: Path, policy_tok: Any) -> None:
    head = make_head(chat_prm, policy_tok, agreement_filter=True)
    with pytest.raises(ConfigError, match="agreement_filter needs the trainer's outcome verifier"):
        head.score(policy_batch(policy_tok))


def test_gate_by_outcome_by_hand() -> None:
    from rl.algos.prm_shaping import gate_by_outcome

    shaped = torch.tensor([[0.0, -1.0], [-1.0, 0.0], [-0.3, -0.2]])
    got = gate_by_outcome(shaped, torch.tensor([1.0, 0.0, 0.4]))  # right, wrong, wrong
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [-1.0, 0.0], [-0.3, -0.2]]))
    with pytest.raises(ValueError, match="expected outcome"):
        gate_by_outcome(shaped, torch.ones(2))


def test_penalise_unflagged_by_hand() -> None:
    """Row 0 wrong, flagged at step 1: unchanged. Row 1 wrong, unflagged: -2 at its lowest
    p (step 2). Row 2 right: unchanged (no penalty). Row 3 wrong, no step: nothing."""
    from rl.algos.prm_shaping import penalise_unflagged

    shaped = torch.tensor([[0.0, -2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.tensor([[0.9, 0.1, 0.05], [0.9, 0.8, 0.3], [0.9, 0.2, 0.9], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    outcome = torch.tensor([0.0, 0.0, 1.0, 0.0])
    got = penalise_unflagged(shaped, p, mask, outcome, penalty=2.0)
    want = shaped.clone()
    want[1, 2] = -2.0
    torch.testing.assert_close(got, want)
    # a padded step (mask 0) is never chosen, even with the lowest p
    p[1, 2], mask[1, 2] = 0.0, 0.0
    got = penalise_unflagged(shaped, p, mask, outcome, penalty=2.0)
    assert got[1].tolist() == [0.0, -2.0, 0.0]


def test_outcome_gate_keeps_step_rewards_of_wrong_responses_only(
    chat_prm: Path, policy_tok: Any
) -> None:
    """Rows 0 and 2 are right: their step rewards are dropped; rows 1 and 3 (wrong) keep
    the ungated head's; the verifier is asked once."""
    batch = policy_batch(policy_tok)
    calls: list[int] = []

    def verifier(
        prompts: list[str], completions: list[str], columns: dict[str, Any]
    ) -> torch.Tensor:
        calls.append(len(prompts))
        return torch.tensor([1.0, 0.0, 1.0, 0.0])

    kwargs = {"shaping": "clip", "eta": 0.9}  # every step's p is below 0.9: all penalised
    plain = checked_score(make_head(chat_prm, policy_tok, **kwargs), batch).token_rewards
    gated = make_head(chat_prm, policy_tok, verifier, outcome_gate=True, **kwargs)
    out = checked_score(gated, batch)
    assert calls == [4]
    assert (plain[[0, 2]] != 0).any()  # the gate has something to remove
    assert torch.equal(out.token_rewards[[0, 2]], torch.zeros_like(plain[[0, 2]]))
    torch.testing.assert_close(out.token_rewards[[1, 3]], plain[[1, 3]])
    assert out.keep is None
    with pytest.raises(ConfigError, match="outcome_gate needs the trainer's outcome verifier"):
        make_head(chat_prm, policy_tok, outcome_gate=True).score(batch)


def test_gate_fallback_puts_one_penalty_on_every_wrong_response(
    chat_prm: Path, policy_tok: Any
) -> None:
    """At threshold 0 the PRM flags nothing: each wrong row with steps (1; row 3 has none)
    takes -penalty at its lowest-p step, right rows (0, 2) nothing."""
    batch = policy_batch(policy_tok)

    def verifier(
        prompts: list[str], completions: list[str], columns: dict[str, Any]
    ) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 1.0, 0.0])

    head = make_head(
        chat_prm,
        policy_tok,
        verifier,
        shaping="first_error",
        threshold=0.0,
        penalty=0.5,
        outcome_gate=True,
        gate_fallback=True,
    )
    out = checked_score(head, batch)
    sums = out.token_rewards.sum(dim=1).tolist()
    assert sums == [0.0, -0.5, 0.0, 0.0]


def test_dropped_row_contributes_no_gradient(policy_tok: Any) -> None:
    """`drop_rows` (the trainer's hook for `keep`) zeroes a row's mask: the policy loss then
    has no gradient on it, and the kept rows' gradients are those of a batch without it."""
    batch = policy_batch(policy_tok, truncate_last=False)
    keep = torch.tensor([True, False, True, True])
    drop_rows(batch, keep)
    assert float(batch.response_mask[1].sum()) == 0.0
    torch.manual_seed(0)
    shape = batch.response_mask.shape
    old = -torch.rand(shape)
    adv = torch.randn(shape)

    def grads(rows: list[int]) -> torch.Tensor:
        logp = (old + 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(1)))[rows]
        logp = logp.clone().requires_grad_(True)
        mask = batch.response_mask[rows]
        loss, _ = policy_loss(
            logp, old[rows], None, adv[rows], mask, clip_low=0.2, clip_high=0.2, kl_coef=0.0,
            mode="token_mean", global_tokens=float(mask.sum()), global_seqs=float(len(rows)),
        )  # fmt: skip
        loss.backward()
        assert logp.grad is not None
        return logp.grad

    full = grads([0, 1, 2, 3])
    assert float(full[1].abs().sum()) == 0.0
    assert float(full[0].abs().sum()) > 0.0
    torch.testing.assert_close(full[[0, 2, 3]], grads([0, 2, 3]))


def test_checked_score_validates_keep() -> None:
    class BadKeep(RewardHead):
        name = "bad_keep"

        def score(self, batch: HeadBatch) -> HeadOutput:
            return HeadOutput(torch.zeros(batch.response_mask.shape), keep=torch.ones(2))

    batch = policy_batch(build_tokenizer())
    with pytest.raises(RewardError, match="keep of the wrong shape"):
        checked_score(BadKeep(), batch)


def test_pipeline_keeps_rows_every_head_keeps() -> None:
    """`RewardPipeline.score` ANDs the heads' `keep` into `Scored.keep` (None when no head
    filters); `drop_rows` then zeroes the dropped rows' response masks."""
    from rewards.base import RewardSpec
    from rewards.build import build_reward_fns
    from rl.trainer.rewards import RewardPipeline

    class Keep(RewardHead):
        def __init__(self, name: str, keep: list[bool] | None) -> None:
            self.name, self.keep = name, keep

        def score(self, batch: HeadBatch) -> HeadOutput:
            keep = None if self.keep is None else torch.tensor(self.keep)
            return HeadOutput(torch.zeros(batch.response_mask.shape), keep=keep)

    tok = build_tokenizer()
    fns = build_reward_fns([RewardSpec("arith")])
    heads: list[tuple[RewardHead, float]] = [
        (Keep("a", [True, False, True, True]), 1.0),
        (Keep("b", None), 1.0),
        (Keep("c", [True, True, False, True]), 1.0),
    ]
    batch = policy_batch(tok, truncate_last=False)
    scored = RewardPipeline(fns, heads, tok, "\n").score(batch)
    assert scored.keep is not None and scored.keep.tolist() == [True, False, False, True]
    drop_rows(batch, scored.keep)
    assert (batch.response_mask.sum(dim=1) > 0).tolist() == [True, False, False, True]
    assert RewardPipeline(fns, heads[1:2], tok, "\n").score(batch).keep is None


def test_span_texts_with_a_token_across_the_delimiter() -> None:
    """A token that runs from the end of one step into the next ('.\\nThe') belongs to the
    earlier step (the trainer's rule 1); the PRM still reads each step's own text."""
    from rewards.prm_head import span_texts

    text = "a=1.\nThe b=2\nc"
    pieces = ["a=1", ".\nThe", " b=2", "\n", "c"]
    offsets, pos = [], 0
    for piece in pieces:
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    assert span_texts(text, offsets, [(0, 1), (2, 3), (4, 4)], "\n") == ["a=1.", "The b=2", "c"]
    # a step no span starts in (rule 3) joins the span before, delimiter kept
    assert span_texts("x\ny\nz", [(0, 3), (3, 4), (4, 5)], [(0, 1), (2, 2)], "\n") == [
        "x\ny",
        "z",
    ]


def test_raw_problems_from_messages() -> None:
    from rewards.prm_head import raw_problems

    batch = policy_batch(build_tokenizer())
    batch.columns["msgs"] = [
        [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}] for i in range(4)
    ]
    assert raw_problems(batch, "msgs") == ["q0", "q1", "q2", "q3"]
    assert raw_problems(batch, "question") == PROBLEMS  # absent: the `prompt` column
    del batch.columns["prompt"]
    with pytest.raises(ConfigError, match="'question'"):
        raw_problems(batch, "question")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"shaping": "minimum"}, ["'minimum'", "clip", "delta", "first_error", "min", "prob"]),
        ({"eta": 1.5}, ["eta", "1.5"]),
        ({"threshold": -0.1}, ["threshold", "-0.1"]),
        ({"penalty": 0.0}, ["penalty", "0.0"]),
        ({"micro_batch_size": 0}, ["micro_batch_size", "0"]),
        ({"agreement_reduce": "median"}, ["'median'"]),
        ({"head": "three_class"}, ["'three_class'"]),
        ({"prompt_format": "markdown"}, ["'markdown'"]),
        ({"good_token": "x", "bad_token": "x"}, ["'x'"]),
        ({"shapeing": "min"}, ["shapeing"]),
        ({"refresh_every": -1}, ["refresh_every", "-1"]),
        ({"refresh_every": 1, "refresh_labeler": "judge"}, ["'judge'"]),
        ({"refresh_every": 1, "refresh_labeler": "mc_hard"}, ["'mc_hard'", "exact"]),
        ({"refresh_every": 1, "refresh_lr": 0.0}, ["refresh_lr"]),
        ({"refresh_every": 1, "refresh_epochs": 0}, ["refresh_epochs"]),
        ({"refresh_every": 1, "refresh_rows": -2}, ["refresh_rows"]),
        ({"refresh_every": 1, "refresh_after_first_error": "cut"}, ["'cut'", "drop"]),
        ({"outcome_gate": True, "shaping": "prob"}, ["outcome_gate", "'prob'"]),
        ({"gate_fallback": True, "shaping": "first_error"}, ["gate_fallback", "False"]),
        ({"gate_fallback": True, "outcome_gate": True, "shaping": "min"}, ["'min'"]),
        ({"refresh_every": 1, "refresh_replay_rows": -1}, ["refresh_replay_rows", "-1"]),
        ({"refresh_every": 1, "refresh_replay": "no/such.jsonl"}, ["'no/such.jsonl'"]),
    ],
)
def test_bad_options_fail_before_any_model_work(
    tmp_path: Path, kwargs: dict[str, Any], named: list[str]
) -> None:
    """A PRM directory that holds only a convention (no weights, no tokenizer): every bad
    option is a one-line ConfigError naming the value at construction."""
    from rewards.build import resolve_head

    save_convention(PRMConvention(step_tag="<step>"), tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_head("prm", {"path": str(tmp_path), **kwargs})
    message = str(err.value)
    assert "\n" not in message
    for part in named:
        assert part in message, message


def test_missing_path_and_missing_tag(tmp_path: Path) -> None:
    from rewards.build import resolve_head

    with pytest.raises(ConfigError, match="does not exist"):
        resolve_head("prm", {"path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="no step_tag"):
        resolve_head("prm", {"path": str(tmp_path)})  # no convention, no step_tag option


def test_multi_token_step_tag_is_a_one_line_error(chat_prm: Path, policy_tok: Any) -> None:
    with pytest.raises(ConfigError) as err:
        make_head(chat_prm, policy_tok, step_tag="<no-such-tag>")
    assert "'<no-such-tag>'" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# On-policy refresh (rl.prm.refresh): a teacher's labels on the scored batch train the PRM
# --------------------------------------------------------------------------------------------


def second_step_wrong(prompt: str, steps: list[str], answer: str | None) -> list[bool]:
    """A test teacher: the first step right, every later one wrong."""
    del prompt, answer
    return [h == 0 for h in range(len(steps))]


TEACHER = "tests.test_prm_head:second_step_wrong"


def lm_weights(head: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in head.model.parameters()]


def test_refresh_trains_the_prm_towards_the_teachers_labels(
    chat_prm: Path, policy_tok: Any
) -> None:
    """After one refresh the steps the teacher called wrong score lower and the right ones
    higher; the labels bought (cut after the first wrong step) are counted; the refresh's
    F1 is the PRM's, before it learned, on the fresh labels."""
    from rl.prm.labelers import make_labeler
    from rl.prm.refresh import label, on_policy_scores, solutions_of

    batch = policy_batch(policy_tok)
    head = make_head(
        chat_prm,
        policy_tok,
        shaping="prob",
        refresh_every=1,
        refresh_labeler=TEACHER,
        refresh_lr=3e-3,
        refresh_epochs=4,
    )
    checked_score(head, batch)
    before, _ = head.step_probs(batch)
    outcome = torch.tensor([1.0, 1.0, 0.0, 0.0])
    problems, steps = head.step_texts(batch)
    examples = label(
        make_labeler(TEACHER), solutions_of(problems, steps, None, [1, 1, 0, 0], range(4)), "drop"
    )
    want = on_policy_scores(
        [before[int(ex.extra["row"])].tolist() for ex in examples], examples, 0.5
    )
    metrics = head.update(batch, outcome)
    # rows 0, 1, 2 have steps (3, 1, 2): labels [T, F], [T], [T, F] once cut -> 5 bought
    assert metrics["teacher_labels"] == 5.0
    assert metrics["refresh_f1"] == pytest.approx(want["f1"])
    assert metrics["refresh_error_recall"] == pytest.approx(want["error_recall"])
    assert metrics["refresh_loss"] > 0
    after, _ = head.step_probs(batch)
    for b, h in ((0, 0), (1, 0), (2, 0)):
        assert after[b, h] > before[b, h], (b, h)
    for b, h in ((0, 1), (2, 1)):
        assert after[b, h] < before[b, h], (b, h)
    assert head.state_dict() == {"calls": 1, "refreshes": 1, "teacher_labels": 5, "solutions": 3}


def test_refresh_every_two_steps_and_frozen_heads(chat_prm: Path, policy_tok: Any) -> None:
    batch = policy_batch(policy_tok)
    outcome = torch.zeros(4)
    head = make_head(chat_prm, policy_tok, refresh_every=2, refresh_labeler=TEACHER)
    start = lm_weights(head)
    checked_score(head, batch)
    assert head.update(batch, outcome) == {"teacher_labels": 0.0}  # step 1: not due
    assert all(torch.equal(a, b) for a, b in zip(start, lm_weights(head), strict=True))
    checked_score(head, batch)
    assert head.update(batch, outcome)["teacher_labels"] == 5.0  # step 2: refreshed
    assert not all(torch.equal(a, b) for a, b in zip(start, lm_weights(head), strict=True))
    restored = make_head(chat_prm, policy_tok, refresh_every=2, refresh_labeler=TEACHER)
    restored.load_state_dict(head.state_dict())
    assert restored.refresh_state == head.refresh_state

    frozen = make_head(chat_prm, policy_tok)
    checked_score(frozen, batch)
    assert frozen.update(batch, outcome) == {}
    assert frozen.engine is None


def test_refresh_rows_labels_a_random_share(chat_prm: Path, policy_tok: Any) -> None:
    from rl.prm.refresh import pick_rows

    assert pick_rows(range(4), 0, 0) == [0, 1, 2, 3]
    assert pick_rows(range(4), 9, 0) == [0, 1, 2, 3]
    two = pick_rows(range(4), 2, 7)
    assert len(two) == 2 and two == sorted(two) and set(two) <= {0, 1, 2, 3}
    assert pick_rows(range(4), 2, 7) == two  # seeded
    batch = policy_batch(policy_tok)
    head = make_head(chat_prm, policy_tok, refresh_every=1, refresh_labeler=TEACHER, refresh_rows=1)
    checked_score(head, batch)
    head.update(batch, torch.zeros(4))
    assert head.refresh_state.solutions <= 1  # one row (none when it drew the stepless row)


def test_on_policy_scores_by_hand() -> None:
    """First errors predicted at 0.5: row 0 at step 1 (right), row 1 none (right), row 2
    none (wrong: its step 1 is the first error). ProcessBench: accuracy 1/2 on erroneous
    rows, 1/1 on correct ones, F1 = 2 * 0.5 * 1 / 1.5; recall of first errors 1/2."""
    from rl.prm.data import StepExample
    from rl.prm.refresh import on_policy_scores

    examples = [
        StepExample("a", ["x", "y"], [True, False]),
        StepExample("b", ["x"], [True]),
        StepExample("c", ["x", "y"], [True, False]),
    ]
    got = on_policy_scores([[0.9, 0.2, 0.1], [0.8], [0.7, 0.6]], examples, 0.5)
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["error_recall"] == pytest.approx(0.5)
    empty = on_policy_scores([], [], 0.5)
    assert math.isnan(empty["f1"]) and math.isnan(empty["error_recall"])
    all_right = on_policy_scores([[0.9]], examples[1:2], 0.5)  # no wrong solution
    assert math.isnan(all_right["f1"]) and math.isnan(all_right["error_recall"])


# --------------------------------------------------------------------------------------------
# Refresh anchors: replay of the PRM's own training data, class-balanced BCE
# --------------------------------------------------------------------------------------------


def test_class_weights_and_balanced_loss_by_hand() -> None:
    """3 good and 1 bad label: weights 4 / (2 * 3) and 4 / (2 * 1); the loss sums each tag's
    BCE times its class weight and counts the tags (padding rows and steps count nothing)."""
    from rl.prm.data import StepExample
    from rl.prm.refresh import balanced_loss, class_weights

    examples = [
        StepExample("a", ["x", "y"], [True, False]),
        StepExample("b", ["x", "y"], [True, True]),
    ]
    good_w, bad_w = class_weights(examples)
    assert (good_w, bad_w) == (pytest.approx(2 / 3), pytest.approx(2.0))
    assert class_weights(examples[1:]) == (1.0, 1.0)  # one class only: unweighted
    z = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.3, 0.0], [1.0, 1.0, 0.0]])
    batch = {
        "targets": torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        "step_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]),
    }
    weight = torch.tensor([1.0, 1.0, 0.0])  # the last row pads the micro-batch

    def bce(logit: float, good: bool) -> float:
        p = 1 / (1 + math.exp(-logit))
        return -math.log(p if good else 1 - p)

    want = (
        good_w * bce(0.5, True)
        + bad_w * bce(-1.0, False)
        + good_w * bce(2.0, True)
        + good_w * bce(0.3, True)
    )
    loss_sum, count = balanced_loss(good_w, bad_w)(z, batch, weight, [0, 1, 0])
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)
    assert float(count) == 4.0


def test_replay_draws_and_cuts(tmp_path: Path) -> None:
    from rl.prm.data import StepExample, write_jsonl
    from rl.prm.refresh import draw_replay, load_replay

    rows = [StepExample(f"p{i}", ["a", "b", "c"], [True, i % 2 == 0, False]) for i in range(6)]
    path = write_jsonl(rows, tmp_path / "pool.jsonl")
    pool = load_replay(str(path), "drop")
    assert [ex.labels for ex in pool[:2]] == [[True, True, False], [True, False]]
    assert [len(ex.labels) for ex in load_replay(str(path), "keep")] == [3] * 6
    two = draw_replay(pool, 2, 5, seed=3)
    assert len(two) == 2 and two == draw_replay(pool, 2, 5, seed=3)  # seeded
    assert len(draw_replay(pool, 0, 4, seed=3)) == 4  # 0: as many as the fresh ones
    assert len(draw_replay(pool, 0, 40, seed=3)) == 6  # never more than the pool
    empty = write_jsonl([], tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match="no step-label rows"):
        load_replay(str(empty), "drop")


def test_refresh_with_replay_and_balance_counts_only_fresh_labels(
    chat_prm: Path, policy_tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replayed solutions are trained on with the fresh ones (and the balanced loss is
    asked for), but only the teacher's fresh labels are counted as bought."""
    import rl.prm.refresh as refresh
    from rl.prm.data import StepExample, write_jsonl

    pool = [
        StepExample(f"{i}+1", [f"{i}+1={i + 1}", f"Answer: {i + 1}"], [True, True])
        for i in range(5)
    ]
    path = write_jsonl(pool, tmp_path / "pool.jsonl")
    seen: dict[str, Any] = {}
    real_train_on = refresh.train_on

    def spy(*args: Any, **kwargs: Any) -> float:
        seen["examples"], seen["balance"] = args[3], kwargs["balance"]
        return real_train_on(*args, **kwargs)

    monkeypatch.setattr(refresh, "train_on", spy)
    head = make_head(
        chat_prm,
        policy_tok,
        refresh_every=1,
        refresh_labeler=TEACHER,
        refresh_replay=str(path),
        refresh_replay_rows=2,
        refresh_balance=True,
    )
    batch = policy_batch(policy_tok)
    checked_score(head, batch)
    start = lm_weights(head)
    metrics = head.update(batch, torch.zeros(4))
    assert metrics["teacher_labels"] == 5.0  # rows 0-2 as in the unanchored refresh
    assert metrics["refresh_replayed"] == 2.0
    assert seen["balance"] is True
    prompts = [ex.prompt for ex in seen["examples"]]
    assert prompts[:3] == PROBLEMS[:3] and set(prompts[3:]) <= {ex.prompt for ex in pool}
    assert len(prompts) == 5
    assert not all(torch.equal(a, b) for a, b in zip(start, lm_weights(head), strict=True))


def test_refresh_trains_every_rank_on_one_order(
    chat_prm: Path, policy_tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank trains on its share of one shuffled order, so the seed of that order may
    not depend on the rank (it did: ranks could train on the same solutions and skip
    others)."""
    import rl.prm.refresh as refresh
    from rl.engine.deepspeed_engine import DistInfo

    seeds: list[int] = []
    monkeypatch.setattr(refresh, "train_on", lambda *args, **kwargs: seeds.append(args[7]) or 0.0)
    batch = policy_batch(policy_tok)
    for rank in (0, 1):
        head = make_head(chat_prm, policy_tok, refresh_every=1, refresh_labeler=TEACHER)
        head.dist = DistInfo(rank=rank, world_size=1, local_rank=rank)
        checked_score(head, batch)
        head.update(batch, torch.zeros(4))
    assert len(seeds) == 2 and seeds[0] == seeds[1]


def test_flag_counts_and_trust_weight_by_hand() -> None:
    """Rows: wrong and flagged, wrong and unflagged, right and flagged, right and unflagged,
    wrong without a step (not counted): recall 1/2, false alarms 1/2 -> trust 0; without the
    flagged right row 1/2 - 0."""
    from rl.algos.prm_shaping import flag_counts, trust_weight

    p = torch.tensor([[0.9, 0.1], [0.9, 0.8], [0.2, 0.9], [0.9, 0.9], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    outcome = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    counts = flag_counts(p, mask, outcome, threshold=0.5)
    assert counts.tolist() == [1.0, 2.0, 1.0, 2.0]
    assert trust_weight(counts) == 0.0
    assert trust_weight(torch.tensor([1.0, 2.0, 0.0, 2.0])) == 0.5
    assert trust_weight(torch.tensor([3.0, 3.0, 0.0, 0.0])) == 1.0  # every response wrong
    assert trust_weight(torch.tensor([0.0, 0.0, 1.0, 4.0])) == 0.0  # nothing wrong to find


def test_trust_scales_the_step_rewards(chat_prm: Path, policy_tok: Any) -> None:
    """With trust the head's step rewards are the untrusted ones times `trust_weight` of the
    batch, logged as `trust`."""
    from rl.algos.prm_shaping import flag_counts, trust_weight

    batch = policy_batch(policy_tok)
    outcome = torch.tensor([0.0, 1.0, 0.0, 0.0])

    def verifier(
        prompts: list[str], completions: list[str], columns: dict[str, Any]
    ) -> torch.Tensor:
        return outcome

    plain = make_head(chat_prm, policy_tok, shaping="clip", eta=0.9)
    p, mask = plain.step_probs(batch)
    threshold = float(p[mask.bool()].median())
    kwargs = {"shaping": "clip", "eta": 0.9, "threshold": threshold}
    want = trust_weight(flag_counts(p, mask, outcome, threshold))
    assert 0.0 < want < 1.0  # a weight that changes the rewards without removing them
    base = checked_score(make_head(chat_prm, policy_tok, **kwargs), batch).token_rewards
    out = checked_score(make_head(chat_prm, policy_tok, verifier, trust=True, **kwargs), batch)
    assert out.metrics["trust"] == pytest.approx(want)
    torch.testing.assert_close(out.token_rewards, base * want)
