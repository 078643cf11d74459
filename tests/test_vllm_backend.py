"""The vLLM backend's engine calls, on a fake engine that records them: sleep and wake
(which memory each wake maps back) and the per-request sampling seeds of a tensor-parallel
engine group. No real engine starts here; `SamplingParams` and `TokensPrompt` are vLLM's."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from rl.rollout import vllm_backend  # noqa: E402
from rl.rollout.backend import SamplingSettings  # noqa: E402
from rl.rollout.vllm_backend import VLLMRollout  # noqa: E402

SAMPLING = SamplingSettings(max_new_tokens=2, temperature=1.0, top_p=1.0)


class FakeLLM:
    """`vllm.LLM`'s calls the backend makes, recorded in `calls` (shared with the test)."""

    def __init__(self, calls: list[tuple[Any, ...]], **kwargs: Any) -> None:
        self.calls = calls
        self.kwargs = kwargs

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        return True

    def collective_rpc(self, method: Any, args: tuple[Any, ...] = ()) -> None:
        self.calls.append(("reload",))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts: list[Any], params: Any, use_tqdm: bool = False) -> list[Any]:
        self.calls.append(("generate", params))
        token = SimpleNamespace(logprob=-0.5)
        sample = SimpleNamespace(token_ids=[7], logprobs=[{7: token}])
        return [SimpleNamespace(outputs=[sample]) for _ in prompts]


def make_rollout(
    monkeypatch: pytest.MonkeyPatch,
    calls: list[tuple[Any, ...]],
    *,
    seed: int = 5,
    tensor_parallel_size: int = 1,
    sleep_mode: bool = True,
) -> VLLMRollout:
    """A `VLLMRollout` built as the trainer builds it, on a `FakeLLM`; with sleep mode on
    (this CPU platform has none, so it is switched on after the build)."""
    fake_vllm = SimpleNamespace(LLM=lambda **kw: FakeLLM(calls, **kw))
    monkeypatch.setattr(vllm_backend, "import_vllm", lambda: fake_vllm)
    monkeypatch.setattr(vllm_backend, "check_architecture", lambda path, vllm: None)
    monkeypatch.setattr(vllm_backend, "tensor_parallel_group", lambda size: None)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    rollout = VLLMRollout(
        tokenizer,
        "unused",
        seed=seed,
        max_model_len=16,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=0.5,
        kv_cache_gib=1,
        sleep_mode=sleep_mode,
    )
    rollout.sleep_mode = sleep_mode
    return rollout


class FakeEngine:
    """What `policy_weights` reads from a DeepSpeed engine (no ZeRO-3)."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(2, 2)

    def zero_optimization_partition_weights(self) -> bool:
        return False


def test_wake_after_sleep_maps_the_weights_once_then_the_kv_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sleep, sync, generate: the weights are woken before the reload, and the second wake
    maps the KV cache only (a bare `wake_up()` would map the weights a second time)."""
    calls: list[tuple[Any, ...]] = []
    rollout = make_rollout(monkeypatch, calls)
    rollout.prepare_for_update()
    rollout.prepare_for_update()  # already asleep: no second sleep
    rollout.sync_weights(FakeEngine())
    rollout.generate_tokens(None, [[3, 4]], SAMPLING)
    assert [c for c in calls if c[0] != "generate"] == [
        ("sleep", 2),
        ("wake_up", ["weights"]),
        ("reload",),
        ("wake_up", ["kv_cache"]),
        ("reset_prefix_cache",),
    ]


def test_awake_engine_is_not_woken(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    rollout = make_rollout(monkeypatch, calls, sleep_mode=False)
    rollout.prepare_for_update()  # no sleep mode: stays awake
    rollout.sync_weights(FakeEngine())
    rollout.generate_tokens(None, [[3, 4]], SAMPLING)
    assert [c[0] for c in calls] == ["reload", "reset_prefix_cache", "generate"]


def _request_seeds(calls: list[tuple[Any, ...]]) -> list[list[int | None]]:
    """Each `generate` call's per-request seeds (one shared SamplingParams: [its seed])."""
    out = []
    for name, *args in calls:
        if name == "generate":
            params = args[0] if isinstance(args[0], list) else [args[0]]
            out.append([p.seed for p in params])
    return out


def test_tensor_parallel_ranks_send_the_same_request_seeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two ranks of one TP engine (the same engine seed) whose global RNGs the trainer then
    seeds differently: both give vLLM the same seed for each of the group's requests,
    distinct across requests and across calls."""
    group = [[3, 4], [5], [6, 7], [8]]  # the group's gathered prompts, the same on each rank
    monkeypatch.setattr(vllm_backend, "gather_group_prompts", lambda ids, g: (group, slice(0, 2)))
    seeds = []
    for rank in (0, 1):
        calls: list[tuple[Any, ...]] = []
        rollout = make_rollout(monkeypatch, calls, seed=7000, tensor_parallel_size=2)
        torch.manual_seed(7000 + rank)  # as the trainer reseeds each rank after the build
        for _ in range(2):
            rollout.generate_tokens(None, group[2 * rank : 2 * rank + 2], SAMPLING)
        seeds.append(_request_seeds(calls))
    assert seeds[0] == seeds[1]
    first, second = seeds[0]
    assert None not in first + second
    assert len(set(first + second)) == 2 * len(group)


def test_one_rank_engines_sample_without_request_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor parallel size 1: one shared SamplingParams without a seed, as before."""
    calls: list[tuple[Any, ...]] = []
    rollout = make_rollout(monkeypatch, calls, sleep_mode=False)
    rollout.generate_tokens(None, [[3, 4], [5]], SAMPLING)
    assert _request_seeds(calls) == [[None]]


class RecordingRewards:
    """`RewardPipeline.score` recorded; `uses_rollout` from the real pipeline's heads."""

    def __init__(self, calls: list[tuple[Any, ...]], heads: list[Any]) -> None:
        from rl.trainer.rewards import RewardPipeline

        self.pipeline = object.__new__(RewardPipeline)
        self.pipeline.heads = [(head, 1.0) for head in heads]
        self.calls = calls

    @property
    def uses_rollout(self) -> bool:
        return self.pipeline.uses_rollout

    def at(self, where: str) -> None:
        return None

    def score(self, batch: Any) -> Any:
        self.calls.append(("score",))
        return SimpleNamespace(keep=None)


@pytest.mark.parametrize("head_name", ["implicit_prm", "pav_mc_oracle"])
def test_engine_sleeps_before_the_heads_unless_one_generates(
    monkeypatch: pytest.MonkeyPatch, head_name: str
) -> None:
    """The trainer's rollout and reward phases: the engine sleeps right after collection, so
    the heads (an implicit PRM's update, a verifier) run without its memory; with
    `pav_mc_oracle`, which generates with the engine while scoring, it stays awake."""
    from rewards.build import resolve_head
    from rl.engine.deepspeed_engine import DistInfo
    from rl.engine.memory import PhaseMeter
    from rl.trainer.loop import Trainer, TrainState

    calls: list[tuple[Any, ...]] = []
    trainer = object.__new__(Trainer)
    trainer.rollout = make_rollout(monkeypatch, calls)
    trainer.rewards = RecordingRewards(calls, [resolve_head(head_name)])  # type: ignore[assignment]
    trainer.collect = lambda: calls.append(("collect",)) or SimpleNamespace()  # type: ignore[method-assign]
    trainer.state, trainer.dist = TrainState(), DistInfo(0, 1, 0)
    trainer.collect_and_score(PhaseMeter())
    order = [c[0] for c in calls]
    if head_name == "pav_mc_oracle":
        assert order == ["collect", "score"]  # awake: the head's rollouts need the engine
    else:
        assert order == ["collect", "sleep", "score"]
