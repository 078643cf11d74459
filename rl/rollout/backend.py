"""Rollouts: prompts -> generations -> `RolloutBatch`.

`RolloutBackend` holds what every backend shares (padding, EOS masks, decoding, grouping);
a backend implements `generate_tokens` and, if it keeps its own copy of the weights,
`sync_weights`. Backend `transformers` runs `generate` on the DeepSpeed engine's module
(under ZeRO-3 either inside one gather of the whole model per call, or with
`synced_gpus=True` so ranks that finish early keep joining the per-layer parameter
gathers); backend `vllm` is in `rl/rollout/vllm_backend.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig

from rl.core.batching import micro_batches
from rl.core.types import RolloutBatch


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample; the same settings drive every backend."""

    max_new_tokens: int
    temperature: float
    top_p: float
    greedy: bool = False
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 = no top-k."""

    def describe(self) -> str:
        """One line for the run log, e.g. "temperature=1.0 top_p=1.0 top_k=off ..."."""
        if self.greedy:
            return f"greedy max_new_tokens={self.max_new_tokens}"
        top_k = self.top_k or "off"
        return (
            f"temperature={self.temperature} top_p={self.top_p} top_k={top_k} "
            f"max_new_tokens={self.max_new_tokens}"
        )


def left_pad(
    sequences: list[list[int]], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ([N, T] ids, [N, T] mask), padded on the left to the longest, rounded
    up to a multiple of `multiple`."""
    longest = max(len(s) for s in sequences)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def response_mask_until_eos(responses: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[N, Tr] 1 on response tokens up to and including the first EOS, 0 after it.

    A response with no EOS (cut at max_new_tokens) keeps all its tokens.
    """
    is_eos = torch.isin(responses, torch.tensor(eos_ids, dtype=responses.dtype))  # [N, Tr]
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before t
    return (eos_before == 0).long()


def stopped(responses: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[N] bool: the response holds a stop token (else it was cut at max_new_tokens)."""
    return torch.isin(responses, torch.tensor(eos_ids, dtype=responses.dtype)).any(dim=1)


def unique_ids(*groups: Any) -> list[int]:
    """The ids of every group (an int, a list of ints or None), first occurrence first."""
    out: list[int] = []
    for group in groups:
        values = [] if group is None else [group] if isinstance(group, int) else list(group)
        out += [int(v) for v in values if int(v) not in out]
    return out


@dataclass
class Generated:
    """Token-level output of a backend for N sequences."""

    input_ids: torch.Tensor
    """[N, Tp + Tr] left-padded prompts then right-padded responses."""
    attention_mask: torch.Tensor
    """[N, Tp + Tr]."""
    response_mask: torch.Tensor
    """[N, Tr] 1 up to and including the first EOS."""
    prompt_length: int
    """Tp."""
    logprobs: torch.Tensor | None = None
    """[N, Tr] the sampler's log-prob of each sampled token (None if it gives none)."""


class RolloutBackend(ABC):
    """Shared part of every generation backend."""

    synced_gpus: bool = False
    """True when `generate` is collective (every rank must make the same calls)."""

    def __init__(self, tokenizer: Any, stop_token_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids: list[int] = unique_ids(tokenizer.eos_token_id, stop_token_ids)
        """Every id that ends a response: the tokenizer's EOS, then `stop_token_ids`."""

    @abstractmethod
    def generate_tokens(
        self, model: Any, prompt_ids: list[list[int]], sampling: SamplingSettings
    ) -> Generated:
        """Sample responses for N prompts (token lists); `model` is the trainer's module."""

    def sync_weights(self, engine: Any) -> None:
        """Copy the policy's current weights into the backend (no-op if it uses them directly)."""
        return None

    def prepare_for_update(self) -> None:
        """Free generation memory while the trainer updates (vLLM sleep mode)."""
        return None

    def close(self) -> None:
        """Release the backend (vLLM tears down its process groups here: call it last)."""
        return None

    def assemble(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, response_mask) from [N, Tp] prompts, [N, Tr] responses."""
        response_mask = response_mask_until_eos(responses, self.eos_ids)  # [N, Tr]
        input_ids = torch.cat([prompt_ids, responses], dim=1)  # [N, Tp + Tr]
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        return input_ids, attention_mask, response_mask

    def rollout(
        self,
        model: Any,
        prompt_ids: list[list[int]],
        prompts: list[str],
        columns: dict[str, list[Any]],
        sampling: SamplingSettings,
        group_size: int,
    ) -> RolloutBatch:
        """K samples for each prompt, grouped contiguously (rows p*K .. p*K+K-1)."""
        repeated_ids = [ids for ids in prompt_ids for _ in range(group_size)]
        out = self.generate_tokens(model, repeated_ids, sampling)
        responses = out.input_ids[:, out.prompt_length :]  # [B, Tr]
        texts = self.tokenizer.batch_decode(
            [r[m.bool()].tolist() for r, m in zip(responses, out.response_mask, strict=True)],
            skip_special_tokens=True,
        )
        return RolloutBatch(
            truncated=~stopped(responses, self.eos_ids),
            input_ids=out.input_ids,
            attention_mask=out.attention_mask,
            response_mask=out.response_mask.float(),
            prompt_length=out.prompt_length,
            prompts=[p for p in prompts for _ in range(group_size)],
            completions=list(texts),
            columns={k: [v for v in vs for _ in range(group_size)] for k, vs in columns.items()},
            group_size=group_size,
            behaviour_logprobs=out.logprobs,
        )


@contextmanager
def only_these_settings(model: Any) -> Iterator[None]:
    """While generating, hide the checkpoint's own generation defaults (its
    `generation_config.json`: temperature, top_k, repetition_penalty, min_length ...), which
    transformers would otherwise fill into every setting the run leaves unset: the run
    samples exactly as configured."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@dataclass(frozen=True)
class DecodingSettings:
    """How `generate` decodes on the transformers backend (`rollout.transformers_*`)."""

    cache: str = "dynamic"
    """`dynamic` (grows every token) or `static` (allocated once, compilable)."""
    compile: bool = False
    """Compile the decoding step (needs the static cache)."""
    prompt_multiple: int = 1
    """Left-pad prompts to a multiple of this many tokens (with `compile`, so calls share a
    few shapes and compile once for each)."""

    def apply(self, config: GenerationConfig) -> GenerationConfig:
        """`config` with this cache and compilation."""
        if self.cache == "static":
            config.cache_implementation = "static"
        if self.compile:
            compiled = CompileConfig(fullgraph=False, dynamic=False)
            # transformers compiles on CUDA-like devices only unless this flag is set (its
            # documented switch for other devices, such as this project's CPU runs)
            compiled._compile_all_devices = True  # type: ignore[assignment]
            config.compile_config = compiled
        else:
            config.disable_compile = True
        return config


class TransformersRollout(RolloutBackend):
    """Generates with `model.generate` in chunks of `batch_size` sequences."""

    def __init__(
        self,
        tokenizer: Any,
        batch_size: int,
        synced_gpus: bool,
        stop_token_ids: list[int] | None = None,
        sampler_logprobs: bool = False,
        gather: Callable[[Any], AbstractContextManager[Any]] | None = None,
        decoding: DecodingSettings = DecodingSettings(),
    ) -> None:
        super().__init__(tokenizer, stop_token_ids)
        self.batch_size = batch_size
        self.decoding = decoding
        self.synced_gpus = synced_gpus
        self.gather = gather
        """With ZeRO-3: a context (model -> context manager) holding the whole model
        gathered on every rank, so `generate` runs without a gather per layer and token."""
        self.sampler_logprobs = sampler_logprobs
        """Also return the sampler's log-prob of each sampled token (from the processed
        scores `generate` samples from), to check the sampler against the trainer."""

    def generation_config(self, sampling: SamplingSettings) -> GenerationConfig:
        if sampling.greedy:
            extra: dict[str, Any] = {"do_sample": False}
        else:
            extra = {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,  # 0, not transformers' default of 50: no top-k
            }
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            output_scores=self.sampler_logprobs,
            return_dict_in_generate=True,
            **extra,
        )
        return self.decoding.apply(config)

    @torch.no_grad()
    def generate_tokens(
        self, model: Any, prompt_ids: list[list[int]], sampling: SamplingSettings
    ) -> Generated:
        """Token lists -> `Generated` on the CPU, like every backend's (sampler log-probs only
        with `sampler_logprobs`: the trainer computes its own). Generation itself runs on
        the model's device."""
        ids, mask = left_pad(prompt_ids, self.pad_id, self.decoding.prompt_multiple)  # [N, Tp]
        device = model.device
        prompt_len = ids.shape[1]
        config = self.generation_config(sampling)
        was_training = model.training
        model.eval()
        chunks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        gathered = self.gather(model) if self.gather is not None else nullcontext()
        with gathered, only_these_settings(model):
            for rows in micro_batches(len(prompt_ids), self.batch_size):
                out = model.generate(
                    input_ids=ids[rows].to(device),
                    attention_mask=mask[rows].to(device),
                    generation_config=config,
                    synced_gpus=self.synced_gpus and self.gather is None,
                )
                tokens = out.sequences[:, prompt_len:]  # [n, tr] responses of this chunk
                logprobs = _scored_logprobs(out.scores, tokens)
                chunks.append((tokens.cpu(), None if logprobs is None else logprobs.cpu()))
        model.train(was_training)
        responses = _stack_right_padded([c[0] for c in chunks], self.pad_id)  # [N, Tr]
        # a chunk shorter than Tr ended with EOS everywhere, so its padding is masked
        input_ids, attention_mask, response_mask = self.assemble(ids, mask, responses)
        logprobs = None
        if self.sampler_logprobs:
            logprobs = _stack_right_padded([c[1] for c in chunks], 0.0) * response_mask
        return Generated(input_ids, attention_mask, response_mask, prompt_len, logprobs)


def _scored_logprobs(scores: Any, tokens: torch.Tensor) -> torch.Tensor | None:
    """Log-probs [n, tr] of the sampled tokens under the processed scores (one [n, V] per
    step) that `generate` sampled from; None without scores."""
    if not scores:
        return None
    logp = torch.stack(scores, dim=1).float().log_softmax(dim=-1)  # [n, tr, V]
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [n, tr]


def _stack_right_padded(chunks: list[Any], pad: float | int) -> torch.Tensor:
    """Row blocks [n_i, t_i] -> [sum n_i, max t_i], right-padded with `pad`."""
    width = max(c.shape[1] for c in chunks)
    dtype = chunks[0].dtype
    out = torch.full((sum(c.shape[0] for c in chunks), width), pad, dtype=dtype)
    row = 0
    for chunk in chunks:
        out[row : row + chunk.shape[0], : chunk.shape[1]] = chunk
        row += chunk.shape[0]
    return out
