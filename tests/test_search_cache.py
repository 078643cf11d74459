"""Prefix-cached verifier scoring for search (`rl.eval.cached_scoring`) against the re-reading
reference (`rl.eval.search.HeadScorer`), and `launch/search.py --head prm` end to end.

Tiny locally built verifiers: a PRM whose tokenizer differs from the policy's (the shipped
chat-tiny BPE plus a `<step>` tag, while the policy is arith-tiny's character tokenizer), a
two_class PRM on the policy's own tokenizer, and a PAV value model. Beam search runs with a
scripted sampler whose steps differ in length from beam to beam, so the cached prefixes of a
micro-batch differ in length (left padding of the cache, right padding of the new tokens).
"""

from __future__ import annotations

import argparse
import csv
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from rl.engine.start_model import build_tokenizer, prompt_text
from rl.eval import search
from rl.eval.cached_scoring import CachedScorer, PRMReader, Reader, reader_for
from tests.models import build_prm as build_tiny_prm
from tests.models import chat_tokenizer, tiny_llama

PROBLEMS = ["3+4*2", "12+3", "1+1+2+5", "5*5"]
EOS_TEXT = "Answer: "


def build_prm(out: Path, tokenizer: Any, **convention: Any) -> Path:
    """A random 2-layer tiny Llama read as a PRM in `convention`, saved with `save_prm`."""
    return build_tiny_prm(
        out, tokenizer, num_layers=2, max_position_embeddings=512, seed=3, **convention
    )


@pytest.fixture(scope="module")
def policy_tok() -> Any:
    return build_tokenizer()


def build_pav(out: Path, tokenizer: Any) -> Path:
    """A random 2-layer value model (random head, so values differ) on the policy tokenizer."""
    from rl.engine.value_model import ValueModel, save_value_model

    lm = tiny_llama(len(tokenizer), num_layers=2, max_position_embeddings=512, seed=4)
    torch.manual_seed(5)
    return save_value_model(ValueModel(lm.model), tokenizer, out)


def setup_head(spec: str, kwargs: dict[str, Any], policy_tok: Any) -> Any:
    from rewards.build import resolve_head
    from rewards.heads import HeadContext

    head = resolve_head(spec, kwargs)
    head.setup(
        HeadContext(
            cfg=None,
            dist=None,
            tokenizer=policy_tok,
            policy_path="",
            ds_config={},
            micro_batch_size=3,
            local_batch_size=3,
        )
    )
    return head


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory, policy_tok: Any) -> dict[str, Any]:
    """name -> a set-up head: the cross-tokenizer PRM, a two_class PRM on the policy's
    tokenizer with a chat-free plain prompt, and a PAV verifier."""
    root = tmp_path_factory.mktemp("verifiers")
    cross = build_prm(root / "cross", chat_tokenizer(), step_tag="<step>", step_separator=" ")
    same = build_prm(root / "same", policy_tok, step_tag="#", head="two_class", prompt_suffix=":")
    pav = build_pav(root / "pav", policy_tok)
    return {
        "prm_cross_tokenizer": setup_head("prm", {"path": str(cross)}, policy_tok),
        "prm_two_class": setup_head("prm", {"path": str(same)}, policy_tok),
        "pav": setup_head("pav", {"path": str(pav)}, policy_tok),
    }


def problems(tok: Any) -> list[search.Problem]:
    ids = [tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in PROBLEMS]
    return [search.Problem(p, i, "0") for p, i in zip(PROBLEMS, ids, strict=True)]


class VaryingSampler(search.Sampler):
    """Each candidate step is an arithmetic line of random length (seeded by the context and
    the candidate's index); after 3 steps a candidate may end with `Answer: N` and EOS."""

    def __init__(self, tok: Any, prompts: Sequence[list[int]]) -> None:
        super().__init__(None, tok, [tok.eos_token_id], tok.pad_token_id, max_new_tokens=400)
        self.prompts = [list(p) for p in prompts]

    def sample(
        self, contexts: Sequence[list[int]], n: int, one_step: bool, budget: int
    ) -> list[list[int]]:
        out = []
        for context in contexts:
            prompt = next(p for p in self.prompts if context[: len(p)] == p)
            depth = self.tokenizer.decode(context[len(prompt) :]).count("\n")
            for k in range(n):
                rng = random.Random(hash((tuple(context), k)))
                steps = 1 if one_step else 4
                text = "".join(self.line(rng, depth + i) for i in range(steps))
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if text.startswith(EOS_TEXT) or not one_step:
                    ids.append(self.tokenizer.eos_token_id)
                out.append(ids)
        self.compute.generated_tokens += sum(len(c) for c in out)
        return out

    @staticmethod
    def line(rng: random.Random, depth: int) -> str:
        if depth >= 3 and rng.random() < 0.5:
            return f"{EOS_TEXT}{rng.randrange(100)}"
        terms = [str(rng.randrange(1, 10 ** rng.randint(1, 3))) for _ in range(rng.randint(2, 4))]
        return "+".join(terms) + f"={rng.randrange(1000)}\n"


class Tee:
    """A scorer that runs the cached scorer and the re-reading reference on every call and
    keeps both answers (it returns the reference's, so the search follows the reference)."""

    def __init__(self, cached: CachedScorer, reference: search.HeadScorer) -> None:
        self.cached = cached
        self.reference = reference
        self.compute = reference.compute
        self.calls: list[tuple[list[list[float]], list[list[float]]]] = []
        self.cached_after: list[int] = []
        """Cache entries right after each `values` call."""

    def values(
        self, problems: Sequence[search.Problem], responses: Sequence[list[int]], keep: bool = True
    ) -> list[list[float]]:
        want = self.reference.values(problems, responses, keep)
        got = self.cached.values(problems, responses, keep)
        self.calls.append((got, want))
        self.cached_after.append(len(self.cached.cache))
        return want

    def retain(self, problems: Sequence[search.Problem], responses: Sequence[list[int]]) -> None:
        self.cached.retain(problems, responses)
        self.reference.retain(problems, responses)


class FedCounter:
    """Wraps a reader; counts the real (unmasked) new tokens of every forward pass."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.config = reader.config
        self.model = getattr(reader, "model", None)
        self.fed = 0

    def render(self, problems: Any, responses: Any) -> Any:
        return self.reader.render(problems, responses)

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any) -> Any:
        self.fed += int(attention_mask[:, -input_ids.shape[1] :].sum())
        return self.reader.forward(input_ids, attention_mask, position_ids, cache)


def scorers(head: Any, tok: Any, batch_size: int) -> tuple[CachedScorer, search.HeadScorer]:
    reader = reader_for(head, tok, tok.pad_token_id, "\n")
    assert reader is not None
    cached = CachedScorer(FedCounter(reader), tok.pad_token_id, batch_size)  # type: ignore[arg-type]
    return cached, search.HeadScorer(head, tok, tok.pad_token_id, "\n", batch_size, reader)


def assert_same_values(got: list[list[float]], want: list[list[float]]) -> None:
    assert [len(v) for v in got] == [len(v) for v in want]
    flat_got = torch.tensor([x for v in got for x in v], dtype=torch.float64)
    flat_want = torch.tensor([x for v in want for x in v], dtype=torch.float64)
    torch.testing.assert_close(flat_got, flat_want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["prm_cross_tokenizer", "prm_two_class", "pav"])
def test_cached_values_match_rereading_over_beam_rounds(
    heads: dict[str, Any], policy_tok: Any, name: str
) -> None:
    head = heads[name]
    probs = problems(policy_tok)
    cached, reference = scorers(head, policy_tok, batch_size=5)  # several uneven micro-batches
    tee = Tee(cached, reference)
    sampler = VaryingSampler(policy_tok, [p.prompt_ids for p in probs])
    search.beam_search(probs, sampler, tee, 2, 3, 0.5, 4, max_steps=5)
    assert len(tee.calls) >= 4  # several rounds, beams of several depths
    depths = {len(v) for got, _ in tee.calls for v in got}
    assert len(depths) >= 4
    for got, want in tee.calls:
        assert_same_values(got, want)
    reader = cached.reader
    assert isinstance(reader, FedCounter)
    assert cached.compute.verifier_tokens == reader.fed > 0  # counted = fed
    # each token once: far fewer than re-reading every prefix every round
    assert cached.compute.verifier_tokens < 0.5 * reference.compute.verifier_tokens
    assert len(cached.cache) == 0  # beam search drops the cache when it is done


def test_cross_tokenizer_counts_the_prms_own_tokens(heads: dict[str, Any], policy_tok: Any) -> None:
    """Round 1 reads each prompt once plus each child's first step (in the PRM's tokenizer);
    round 2 reads only `separator + step + tag` on top of the kept beam."""
    head = heads["prm_cross_tokenizer"]
    assert head.prm_tokenizer.get_vocab() != policy_tok.get_vocab()
    probs = problems(policy_tok)[:2]
    cached, reference = scorers(head, policy_tok, batch_size=3)
    reader = reader_for(head, policy_tok, policy_tok.pad_token_id, "\n")
    assert isinstance(reader, PRMReader)
    encode = policy_tok.encode
    first = [
        encode("12+3=15\n", add_special_tokens=False),
        encode("7=7\n", add_special_tokens=False),
    ]
    rows1 = [first[0], first[1], first[0]]  # problem 0 twice (different beams), problem 1 once
    owners1 = [probs[0], probs[1], probs[1]]
    rendered1 = reader.render(owners1, rows1)
    assert_same_values(cached.values(owners1, rows1), reference.values(owners1, rows1))
    prompts = {tuple(r.ids[: r.prompt_length]) for r in rendered1}
    want1 = sum(map(len, prompts)) + sum(len(r.ids) - r.prompt_length for r in rendered1)
    assert cached.compute.verifier_tokens == want1
    assert reference.compute.verifier_tokens == sum(len(r.ids) for r in rendered1)
    prm_tokens = sum(len(r.ids) for r in rendered1)
    policy_tokens = sum(len(p.prompt_ids) + len(r) for p, r in zip(owners1, rows1, strict=True))
    assert prm_tokens != policy_tokens  # the PRM's own tokenizer is what is counted

    cached.retain([owners1[0]], [rows1[0]])  # one beam survives
    assert len(cached.cache) == 2  # its row and its prompt
    step = encode("15*2=30\n", add_special_tokens=False)
    rows2 = [rows1[0] + step, rows1[0] + step[:3] + encode("\n", add_special_tokens=False)]
    owners2 = [probs[0], probs[0]]
    before = cached.compute.verifier_tokens
    assert_same_values(cached.values(owners2, rows2), reference.values(owners2, rows2))
    parent = rendered1[0].ids
    rendered2 = reader.render(owners2, rows2)
    for r in rendered2:
        assert r.ids[: len(parent)] == parent  # the parent's rendering is the cached prefix
    want2 = sum(len(r.ids) - len(parent) for r in rendered2)
    assert cached.compute.verifier_tokens - before == want2
    sep = head.prm_tokenizer(" 15*2=30", add_special_tokens=False)["input_ids"]
    assert len(rendered2[0].ids) - len(parent) == len(sep) + 1  # separator + step, then tag


def test_best_of_n_reads_each_prompt_once(heads: dict[str, Any], policy_tok: Any) -> None:
    head = heads["prm_cross_tokenizer"]
    probs = problems(policy_tok)
    cached, reference = scorers(head, policy_tok, batch_size=4)
    tee = Tee(cached, reference)
    sampler = VaryingSampler(policy_tok, [p.prompt_ids for p in probs])
    search.best_of_n_and_majority(probs, sampler, tee, 3)
    ((got, want),) = tee.calls
    assert_same_values(got, want)
    reader = reader_for(head, policy_tok, policy_tok.pad_token_id, "\n")
    assert reader is not None
    prompt_tokens = sum(len(reader.render([p], [[]])[0].ids) for p in probs)
    # the reference reads each prompt 3 times, the cached scorer once
    assert reference.compute.verifier_tokens - cached.compute.verifier_tokens == 2 * prompt_tokens
    assert tee.cached_after == [len(probs)]  # whole solutions are ranked, not cached
    assert len(cached.cache) == 0


def test_unsupported_head_has_no_reader(policy_tok: Any) -> None:
    class Other:
        granularity = "step"

    assert reader_for(Other(), policy_tok, 0, "\n") is None


# ------------------------------------------------------------------------ launch/search.py


def tiny_policy(out: Path) -> Path:
    """A random tiny Llama with arith-tiny's tokenizer, saved as a plain checkpoint (no start
    model to build: the search only needs something to sample from)."""
    tok = build_tokenizer()
    tiny_llama(len(tok), max_position_embeddings=512, seed=2).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def search_args(prm: Path, policy: Path, out: Path, *extra: str) -> argparse.Namespace:
    from launch.search import parse_args
    from tests.launcher import REPO

    return parse_args(
        [
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--head",
            "prm",
            "--head-kwargs",
            f"{{path: '{prm}'}}",
            "--policy",
            str(policy),
            "--budgets",
            "4",
            "--n",
            "3",
            "--strategies",
            "best_of_n,beam",
            "--max-steps",
            "4",
            "--out",
            str(out),
            *extra,
            "rollout.max_new_tokens=24",
            "trainer.micro_batch_size=4",
            "data.train_size=16",
            "reward.functions=[{fn: arith}]",
            "logging.progress_bar=false",
        ]
    )


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment `init_distributed` would set for a plain `python` run, set here so
    that it is undone after the test (run() joins and leaves a gloo world of one)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)


def test_launch_search_with_a_prm_head(tmp_path: Path, world_of_one: None) -> None:
    """best_of_n and beam with `--head prm` (a PRM in another tokenizer than the policy's),
    with and without the cache: same seed, same samples, so the same accuracy and policy
    tokens; the cache reads fewer verifier tokens."""
    from launch.search import run, write_outputs

    prm = build_prm(tmp_path / "prm", chat_tokenizer(), step_tag="<step>")
    policy = tiny_policy(tmp_path / "policy")
    rows = {}
    for cache in ("on", "off"):
        args = search_args(prm, policy, tmp_path / cache, "--scorer-cache", cache)
        rows[cache] = run(args)
        write_outputs(rows[cache], args.out)
        with open(args.out / "search.csv") as f:
            assert [r["strategy"] for r in csv.DictReader(f)] == ["best_of_n", "beam"]
    for on, off in zip(rows["on"], rows["off"], strict=True):
        assert on["strategy"] == off["strategy"]
        assert on["accuracy"] == off["accuracy"]
        assert on["generated_tokens_per_problem"] == off["generated_tokens_per_problem"]
        assert 0 < on["verifier_tokens_per_problem"] < off["verifier_tokens_per_problem"]
        assert on["scorer_cache"] == "on" and off["scorer_cache"] == "off"


class ConstantHead:
    """A step head the cache does not know (a user's head): 0.5 on every response token."""

    name = "constant"
    granularity = "step"

    def setup(self, ctx: Any) -> None:
        pass

    def step_values(self, batch: Any) -> torch.Tensor:
        return 0.5 * batch.response_mask


def test_scorer_cache_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default: cached where the head supports it, re-reading otherwise; explicit `on` with
    an unsupported head and a value that is neither on nor off are one-line errors."""
    import launch.eval_prm
    from launch.search import checked_options, make_scorer, parse_args
    from rl.core.errors import ConfigError
    from tests.launcher import REPO

    policy_tok = build_tokenizer()
    prm = build_prm(tmp_path / "prm", chat_tokenizer(), step_tag="<step>")
    built = {"prm": setup_head("prm", {"path": str(prm)}, policy_tok), "constant": ConstantHead()}
    monkeypatch.setattr(launch.eval_prm, "build_head", lambda spec, kwargs, **_: built[spec])
    config = str(REPO / "configs" / "quickstart.yaml")
    from rl.config import load_config

    cfg = load_config(config, [])

    def scorer(head: str, *option: str) -> Any:
        args = parse_args(["--config", config, "--head", head, *option])
        checked_options(args)
        return make_scorer(args, cfg, None, policy_tok, "")

    assert isinstance(scorer("prm"), CachedScorer)
    assert isinstance(scorer("prm", "--scorer-cache", "off"), search.HeadScorer)
    assert isinstance(scorer("constant"), search.HeadScorer)
    with pytest.raises(ConfigError, match="--scorer-cache on: head 'constant'"):
        scorer("constant", "--scorer-cache", "on")
    with pytest.raises(ConfigError, match="--scorer-cache: expected on or off, got 'maybe'"):
        scorer("prm", "--scorer-cache", "maybe")
