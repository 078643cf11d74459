"""Per-GPU memory plan of a training run, from the config and the model's architecture alone
(no weights are read, no device is touched): what `launch/train_rl.py --dry-run` prints.

Each line of the plan is one small closed formula in bytes per GPU (`GIB` = 2**30 bytes);
P is a parameter count, N the data-parallel world size, b the bytes of one value in the
run's dtype (2 for bf16, 4 for fp32). What is counted, per phase of a step:

- resident (both phases): each model's weights, the trained models' optimizer state (and,
  under ZeRO-3, their gradient partitions and buckets), the vLLM engine's share when it
  does not sleep;
- update phase: + the trained model's gradients and DeepSpeed's gradient buckets (ZeRO-1/2),
  the activations of one micro-batch and the output layer's chunked log-prob working set;
- rollout phase: + the generation's KV cache (transformers backend) or vLLM's share of
  the GPU (`rollout.backend.gpu_memory_utilization` x GPU memory), and the whole gathered
  policy under ZeRO-3 when `rollout.backend.zero3_gather_for_generation`.

Not counted: the CUDA context and NCCL's own buffers (outside torch's allocator, ~0.5-1 GiB
per GPU), allocator fragmentation, the forward-only passes (smaller than the update's),
and the reward functions. The models are assumed to be Llama/Qwen2-style decoders
(`Architecture`); other families get their size from the same formula, approximately.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl.core.batching import BatchPlan, plan_batches
from rl.core.errors import ConfigError
from rl.rollout.backend_specs import TransformersBackend, VLLMBackend

if TYPE_CHECKING:
    from rl.config import Config

GIB = 2**30
"""Bytes in a GiB."""

DEFAULT_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default `reduce_bucket_size` (elements; deepspeed/runtime/zero/config.py)."""

CHUNK_TOKENS = 128
"""Response positions per chunk of the output layer: `rl.engine.forward.CHUNK_TOKENS`
(repeated here so the plan imports no torch; a test checks that the two agree)."""

FP32_CHUNK_LOGITS_LIVE = 4
"""float32 [micro_batch, chunk, vocab] tensors alive at once in a chunk's backward
(`rl.engine.forward._ChunkLogprobs.backward`: the recomputed logits, the probabilities,
their gradient and one temporary of the entropy term)."""


@dataclass(frozen=True)
class Architecture:
    """The shape numbers of a Llama/Qwen2-style decoder (what its config.json holds)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """Biases on the query, key and value projections (Qwen2: yes; Llama: no)."""
    head_dim: int | None = None
    """Per-head width when the config sets it; None = hidden_size / num_heads."""

    @property
    def head_width(self) -> int:
        """Per-head width (elements)."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def kv_width(self) -> int:
        """Width of the key (and of the value) projection: kv heads x head width."""
        return self.num_kv_heads * self.head_width


# Qwen2.5 shapes, from each checkpoint's config.json on the Hugging Face hub
# (https://huggingface.co/<name>/blob/main/config.json): hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
# tie_word_embeddings. The base and instruct checkpoints of a size share their shape.
_QWEN25_1_5B = Architecture(1536, 28, 12, 2, 8960, 151936, True, True)
_QWEN25_7B = Architecture(3584, 28, 28, 4, 18944, 152064, False, True)
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "Qwen/Qwen2.5-1.5B": _QWEN25_1_5B,
    "Qwen/Qwen2.5-1.5B-Instruct": _QWEN25_1_5B,
    "Qwen/Qwen2.5-Math-1.5B": _QWEN25_1_5B,
    "Qwen/Qwen2.5-Math-1.5B-Instruct": _QWEN25_1_5B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen2.5-Math-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-Math-7B-Instruct": _QWEN25_7B,
}
"""Architectures the plan knows without a hub, by hub name."""


def parameter_count(arch: Architecture) -> int:
    """Parameters of a Llama/Qwen2-style causal LM.

    embedding V*h; per layer: q and o projections 2*h*(heads*d), k and v 2*h*kv
    (+ (heads*d + 2*kv) biases when `qkv_bias`), MLP 3*h*i, two RMSNorms 2*h; final norm h;
    an output layer V*h unless tied. (Qwen2.5-1.5B: 1,543,714,304.)"""
    h, kv, q = arch.hidden_size, arch.kv_width, arch.num_heads * arch.head_width
    attention = 2 * h * q + 2 * h * kv + ((q + 2 * kv) if arch.qkv_bias else 0)
    layer = attention + 3 * h * arch.intermediate_size + 2 * h
    embedding = arch.vocab_size * h
    head = 0 if arch.tie_word_embeddings else embedding
    return embedding + arch.num_layers * layer + h + head


def backbone_parameter_count(arch: Architecture) -> int:
    """Parameters of the model without its output layer (a value model's backbone: the PPO
    critic, the PAV verifier); equal to `parameter_count` when the embeddings are tied."""
    untied_head = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
    return parameter_count(arch) - untied_head


def largest_module_parameters(arch: Architecture) -> int:
    """Parameters of the largest single module (the token embedding, V*h, for these shapes;
    ZeRO-3 gathers one module whole at a time)."""
    return max(arch.vocab_size * arch.hidden_size, arch.hidden_size * arch.intermediate_size)


def architecture_from_hf_config(config: Any) -> Architecture:
    """`Architecture` of a transformers `PretrainedConfig` (or anything with its fields)."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and int(head_dim) == int(config.hidden_size) // heads:
        head_dim = None  # the default width, written out
    return Architecture(
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=getattr(config, "model_type", "") == "qwen2"
        or bool(getattr(config, "attention_bias", False)),
        head_dim=None if head_dim is None else int(head_dim),
    )


BUILTIN_KINDS = {
    "builtin:arith-tiny": ("arith-tiny", False),
    "builtin:chat-tiny": ("chat-tiny", True),
}
"""Builtin start models: (directory prefix of the shipped copies, Qwen2 shape with half as
many kv heads and qkv biases (chat-tiny) or Llama with full heads (arith-tiny))."""


def builtin_architecture(name: str, tiny_overrides: dict[str, Any]) -> Architecture:
    """Shape of a builtin start model: `rl.engine.tiny_config.TinyModelConfig` with the
    config's `model.tiny` overrides, the vocabulary of a shipped copy of that kind."""
    from rl.engine.tiny_config import TinyModelConfig

    prefix, qwen2 = BUILTIN_KINDS[name]
    shape_keys = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
    fields = {k: v for k, v in tiny_overrides.items() if k in shape_keys}
    tiny = TinyModelConfig(**fields)
    shipped = sorted((Path(__file__).parent / "start_models").glob(f"{prefix}-*/config.json"))
    if not shipped:
        raise ConfigError(f"model.path={name}: no shipped copy to read its vocabulary from")
    vocab = int(json.loads(shipped[0].read_text())["vocab_size"])
    return Architecture(
        hidden_size=tiny.hidden_size,
        num_layers=tiny.num_layers,
        num_heads=tiny.num_heads,
        num_kv_heads=tiny.num_heads // 2 if qwen2 else tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        vocab_size=vocab,
        tie_word_embeddings=True,
        qkv_bias=qwen2,
    )


def architecture_for(name: str, tiny_overrides: dict[str, Any] | None = None) -> Architecture:
    """The architecture of model `name`: the builtin models' recipe, `KNOWN_ARCHITECTURES`,
    else `transformers.AutoConfig.from_pretrained(name)` (a local directory, or the hub's
    config.json only: never weights). ConfigError naming the model when none works."""
    if name in BUILTIN_KINDS:
        return builtin_architecture(name, tiny_overrides or {})
    if name in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[name]
    try:
        from transformers import AutoConfig

        return architecture_from_hf_config(AutoConfig.from_pretrained(name))
    except Exception as err:  # offline hub, unknown name, a config without these fields
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model {name!r}: architecture unknown: not in rl.engine.memory_plan."
            f"KNOWN_ARCHITECTURES and AutoConfig.from_pretrained failed ({first})"
        ) from err


# ---- model states (weights, gradients, optimizer) -------------------------------------


def weight_bytes(params: int, value_bytes: int, zero_stage: int, world_size: int) -> int:
    """Weights held by one GPU: P*b, or P*b/N under ZeRO-3 (partitioned)."""
    total = params * value_bytes
    return total // world_size if zero_stage == 3 else total


def gradient_bytes(
    params: int, value_bytes: int, zero_stage: int, world_size: int, offload: bool
) -> int:
    """Gradients held by one GPU during the update: P*b/N under ZeRO-2/3 (partitioned; on the
    CPU with optimizer offload: 0), P*b under ZeRO-1; ZeRO-0 in 16 bits keeps a float32
    accumulation beside them (DeepSpeed's bf16 optimizer): P*(b + 4)."""
    if zero_stage >= 2:
        return 0 if offload else params * value_bytes // world_size
    if zero_stage == 1:
        return params * value_bytes
    return params * (value_bytes + (4 if value_bytes < 4 else 0))


def optimizer_bytes(
    params: int, value_bytes: int, zero_stage: int, world_size: int, offload: bool
) -> int:
    """AdamW state on one GPU: two float32 moments (8 B/param) plus, for 16-bit weights, a
    float32 master copy (4 B/param): 12*P (bf16) or 8*P (fp32); divided by N under ZeRO-1/2/3;
    0 with optimizer offload (it lives in CPU memory, `offloaded_optimizer_bytes`)."""
    per_param = 8 + (4 if value_bytes < 4 else 0)
    if offload:
        return 0
    return params * per_param // (world_size if zero_stage >= 1 else 1)


def offloaded_optimizer_bytes(params: int, value_bytes: int, world_size: int) -> int:
    """CPU memory one rank's offloaded AdamW state and float32 gradients take: (12 or 8 + 4)
    B/param / N (ZeRO-2/3 partition it)."""
    per_param = 8 + (4 if value_bytes < 4 else 0) + 4
    return params * per_param // world_size


def gradient_bucket_bytes(zero_stage: int, ds_zero: dict[str, Any], grad_value_bytes: int) -> int:
    """DeepSpeed's gradient reduction buckets: ZeRO-1/2 with `contiguous_gradients`:
    `reduce_bucket_size` elements, twice with `overlap_comm` (double buffering); ZeRO-3: one
    flat bucket of `reduce_bucket_size` elements. 5e8 elements by default = 954 MiB per buffer
    in bf16, whatever the model's size."""
    elements = int(ds_zero.get("reduce_bucket_size", DEFAULT_BUCKET_ELEMENTS))
    if zero_stage in (1, 2):
        if not ds_zero.get("contiguous_gradients", True):
            return 0
        return elements * grad_value_bytes * (2 if ds_zero.get("overlap_comm", False) else 1)
    if zero_stage == 3:
        return elements * grad_value_bytes
    return 0


def zero3_gathered_bytes(arch: Architecture, value_bytes: int, zero_stage: int) -> int:
    """ZeRO-3 working set: the largest module gathered whole plus its unpartitioned gradient,
    2 * L * b (DeepSpeed's own estimator allows 4 * L bytes); 0 below ZeRO-3."""
    return 2 * largest_module_parameters(arch) * value_bytes if zero_stage == 3 else 0


# ---- activations ---------------------------------------------------------------------


def layer_activation_bytes_per_token(arch: Architecture, value_bytes: int) -> int:
    """Bytes one decoder layer keeps per token for its backward pass (no checkpointing):
    two RMSNorms, each its float32 input (4h) and its normalised output (b*h); query, key,
    value after RoPE (b*(h_q + 2*kv)); the attention output and the o-projection's input
    (2*b*h); the SwiGLU MLP's gate, up, SiLU(gate) and product (4*b*i). With flash/SDPA
    attention no [heads, T, T] score matrix is kept.
    = 8h + b*(3h + h_q + 2*kv + 4i)  (Qwen2.5-1.5B in bf16: 100,352 B)."""
    h, i = arch.hidden_size, arch.intermediate_size
    q = arch.num_heads * arch.head_width
    norms = 2 * (4 * h + value_bytes * h)
    attention = value_bytes * (q + 2 * arch.kv_width + 2 * h)
    mlp = value_bytes * 4 * i
    return norms + attention + mlp


def activation_bytes(
    arch: Architecture, value_bytes: int, tokens: int, gradient_checkpointing: bool
) -> int:
    """Activations of one micro-batch of `tokens` (= sequences x (prompt + response) tokens)
    kept for the backward pass. Without checkpointing: layers * tokens * per-layer bytes.
    With it: each layer's input (b*h per token per layer) plus one layer recomputed whole
    during the backward pass: tokens * (layers*b*h + per-layer bytes)."""
    per_layer = layer_activation_bytes_per_token(arch, value_bytes)
    if gradient_checkpointing:
        return tokens * (arch.num_layers * value_bytes * arch.hidden_size + per_layer)
    return tokens * arch.num_layers * per_layer


def output_layer_bytes(
    arch: Architecture, value_bytes: int, micro_batch: int, response_tokens: int, zero_stage: int
) -> int:
    """Working set of the chunked log-probs (`rl.engine.forward`) in the backward pass:
    FP32_CHUNK_LOGITS_LIVE float32 [micro_batch, chunk, V] tensors, plus the output layer's
    gradient: summed over the chunks in one float32 buffer and returned in the model's dtype
    (4 * V * h + b * V * h). Under ZeRO-3 each chunk runs the (gathered) output layer as a
    module, checkpointed, and DeepSpeed reduces each chunk's weight gradient as it comes: one
    gradient in the model's dtype, b * V * h (the gathered weight is the "ZeRO-3 gathered
    module" line)."""
    vocab = arch.vocab_size
    chunk = min(CHUNK_TOKENS, response_tokens)
    chunks = FP32_CHUNK_LOGITS_LIVE * micro_batch * chunk * vocab * 4
    if zero_stage == 3:
        return chunks + value_bytes * vocab * arch.hidden_size
    return chunks + (4 + value_bytes) * vocab * arch.hidden_size


# ---- rollouts ------------------------------------------------------------------------


def kv_cache_bytes_per_token(arch: Architecture, value_bytes: int) -> int:
    """KV cache of one token: keys and values of every layer, 2 * layers * kv * b
    (Qwen2.5-1.5B in bf16: 28,672 B; 7B: 57,344 B)."""
    return 2 * arch.num_layers * arch.kv_width * value_bytes


def generate_kv_bytes(
    arch: Architecture, value_bytes: int, sequences: int, sequence_tokens: int
) -> int:
    """transformers `generate`'s KV cache for `sequences` generated together, each up to
    `sequence_tokens` (prompt + response) long."""
    return sequences * sequence_tokens * kv_cache_bytes_per_token(arch, value_bytes)


def vllm_share_bytes(gpu_memory_utilization: float, gpu_memory_bytes: int) -> int:
    """What one vLLM engine reserves on its GPU: `gpu_memory_utilization` x GPU memory (its
    weights, activations and KV cache all come out of this share)."""
    return int(gpu_memory_utilization * gpu_memory_bytes)


# ---- the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldSize:
    """The number of ranks the plan is for, and where it came from."""

    ranks: int
    nodes: int
    source: str
    """`launcher env WORLD_SIZE` or `recipe cluster.nodes x cluster.gpus_per_node`."""


def plan_world_size(cfg: Config, environ: dict[str, str] | None = None) -> WorldSize:
    """WORLD_SIZE from a launcher's environment when set, else the recipe's cluster."""
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE"):
        ranks = int(env["WORLD_SIZE"])
        per_node = int(env.get("LOCAL_WORLD_SIZE") or cfg.cluster.gpus_per_node)
        return WorldSize(ranks, max(1, ranks // per_node), "launcher env WORLD_SIZE")
    return WorldSize(
        cfg.cluster.nodes * cfg.cluster.gpus_per_node,
        cfg.cluster.nodes,
        "recipe cluster.nodes x cluster.gpus_per_node",
    )


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """How a step's rollouts split on each of `world_size` ranks (the trainer's own split:
    `rl.core.batching.plan_batches` of the rollout, algo and trainer settings)."""
    return plan_batches(
        cfg.rollout.prompts_per_step,
        cfg.rollout.group_size,
        cfg.algo.mini_batches,
        cfg.trainer.micro_batch_size,
        world_size,
    )


def read_ds_config(path: str) -> dict[str, Any]:
    """The DeepSpeed JSON `deepspeed.config` names (ConfigError when missing or malformed)."""
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"deepspeed.config: cannot read {path!r}: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"deepspeed.config: {path!r} is not a JSON object")
    return loaded


@dataclass(frozen=True)
class MemoryItem:
    """One line of the plan: bytes per GPU, the phases it is held in."""

    name: str
    bytes: int
    phases: tuple[str, ...]
    """Subset of ("rollout", "update")."""
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """Everything `--dry-run` prints: the world, the batch split and the memory lines."""

    model: str
    params: int
    value_bytes: int
    world: WorldSize
    batches: BatchPlan
    zero_stage: int
    optimizer_offload: bool
    sequence_tokens: int
    items: tuple[MemoryItem, ...]
    activations_other: int
    """The policy's activations with the other gradient-checkpointing setting."""
    gpu_memory_bytes: int
    cpu_offload_bytes: int
    notes: tuple[str, ...]

    def phase_bytes(self, phase: str) -> int:
        """Peak bytes per GPU in `phase` ("rollout" or "update")."""
        return sum(item.bytes for item in self.items if phase in item.phases)

    @property
    def peak_bytes(self) -> int:
        """The larger of the two phases' peaks."""
        return max(self.phase_bytes("rollout"), self.phase_bytes("update"))


def model_state_items(
    label: str, params: int, b: int, stage: int, ranks: int, offload: bool
) -> list[MemoryItem]:
    """Weights and optimizer state (both phases) and gradients of a trained model. ZeRO-3
    keeps its gradient partition in one buffer allocated with the optimizer (both phases);
    below it the gradients exist from the first backward pass to the optimizer step."""
    both = ("rollout", "update")
    grad_phases = both if stage == 3 else ("update",)
    return [
        MemoryItem(f"{label} weights", weight_bytes(params, b, stage, ranks), both),
        MemoryItem(
            f"{label} gradients", gradient_bytes(params, b, stage, ranks, offload), grad_phases
        ),
        MemoryItem(f"{label} optimizer", optimizer_bytes(params, b, stage, ranks, offload), both),
    ]


def value_bytes_of(dtype: str) -> int:
    """Bytes per value of `model.dtype` on a GPU (auto = bf16)."""
    return 4 if dtype == "float32" else 2


@dataclass(frozen=True)
class ZeroSetup:
    """How DeepSpeed holds the trained models: the ZeRO stage, optimizer offload, and the
    JSON's `zero_optimization` section (bucket sizes)."""

    stage: int
    offload: bool
    section: dict[str, Any]


def zero_setup(cfg: Config) -> ZeroSetup:
    """`deepspeed.config`'s ZeRO settings, `deepspeed.zero_stage` overriding its stage."""
    zero = dict(read_ds_config(cfg.deepspeed.config).get("zero_optimization") or {})
    stage = cfg.deepspeed.zero_stage
    if stage is None:
        stage = int(zero.get("stage", 0))
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return ZeroSetup(stage, device not in ("none", None), zero)


def extra_model_items(
    cfg: Config, arch: Architecture, zero: ZeroSetup, ranks: int, b: int
) -> tuple[list[MemoryItem], int]:
    """The models besides the policy, and how many of them are trained: the implicit PRM
    (trained) and its reference, the policy's reference (`algo.kl_coef` > 0; one frozen copy
    serves both), the PPO critic (`algo.credit=gae`, trained) and the PAV verifier (frozen).
    Frozen models are 16-bit weights only, partitioned under ZeRO-3, on the CPU with
    `model.offload_references` (ZeRO-3)."""
    both = ("rollout", "update")
    params = parameter_count(arch)
    on_cpu = cfg.model.offload_references and zero.stage == 3
    heads = [h.head for h in cfg.reward.heads]
    items: list[MemoryItem] = []
    trained = 0
    needs_reference = cfg.algo.kl_coef > 0
    if "implicit_prm" in heads:
        items += model_state_items("implicit PRM", params, b, zero.stage, ranks, zero.offload)
        trained += 1
        needs_reference = True  # the PRM's reference: the trainer's own when there is one
    if needs_reference:
        ref = 0 if on_cpu else weight_bytes(params, b, zero.stage, ranks)
        items.append(MemoryItem("reference (frozen)", ref, both))
    if cfg.algo.credit.needs_critic:
        critic = backbone_parameter_count(arch)
        items += model_state_items("critic", critic, b, zero.stage, ranks, zero.offload)
        trained += 1
    if "pav" in heads:
        verifier_arch = arch if cfg.pav.init_model is None else architecture_for(cfg.pav.init_model)
        verifier = backbone_parameter_count(verifier_arch)
        held = 0 if on_cpu else weight_bytes(verifier, b, zero.stage, ranks)
        items.append(MemoryItem("PAV verifier (frozen)", held, both))
    return items, trained


def update_items(
    cfg: Config,
    arch: Architecture,
    zero: ZeroSetup,
    trained_engines: int,
    micro_batch: int,
    seq: int,
    tr: int,
    b: int,
) -> list[MemoryItem]:
    """DeepSpeed's buckets (and ZeRO-3's gathered module), the policy's activations and the
    output layer's working set for one micro-batch of `seq`-token sequences (`tr` response
    tokens). ZeRO-3 keeps a bucket per trained engine for the whole run; ZeRO-1/2 allocate
    theirs at each backward pass, and the engines' backward passes never overlap."""
    both = ("rollout", "update")
    # ZeRO-3 allocates its bucket with the optimizer; ZeRO-1/2 at every backward pass
    bucket_phases = both if zero.stage == 3 else ("update",)
    buckets = gradient_bucket_bytes(zero.stage, zero.section, b)
    if zero.stage == 3:
        buckets *= trained_engines
    items = [MemoryItem("ZeRO gradient buckets", buckets, bucket_phases)]
    if zero.stage == 3:
        gathered = zero3_gathered_bytes(arch, b, zero.stage)
        items.append(MemoryItem("ZeRO-3 gathered module", gathered, both))
    gc = cfg.model.gradient_checkpointing
    items.append(
        MemoryItem(
            f"activations ({'with' if gc else 'no'} gradient checkpointing)",
            activation_bytes(arch, b, micro_batch * seq, gc),
            ("update",),
            f"{micro_batch} seqs x {seq} tokens",
        )
    )
    chunked = output_layer_bytes(arch, b, micro_batch, tr, zero.stage)
    items.append(MemoryItem("output layer (chunked log-probs)", chunked, ("update",)))
    return items


def rollout_items(
    cfg: Config, arch: Architecture, zero: ZeroSetup, local_seqs: int, seq: int, b: int
) -> tuple[list[MemoryItem], list[str]]:
    """The generation's memory (and notes): vLLM's share of the GPU (rollout phase only with
    sleep mode), or `generate`'s KV cache plus, under ZeRO-3 with
    `rollout.backend.zero3_gather_for_generation`, the whole policy gathered."""
    rollout, backend = cfg.rollout, cfg.rollout.backend
    params = parameter_count(arch)
    if isinstance(backend, VLLMBackend):
        gpu_bytes = int(cfg.cluster.gpu_memory_gib * GIB)
        share = vllm_share_bytes(backend.gpu_memory_utilization, gpu_bytes)
        tp_size = backend.tensor_parallel_size
        engine_weights = params * b // tp_size
        kv_room = share - engine_weights
        per_seq = seq * kv_cache_bytes_per_token(arch, b) // tp_size
        fits = max(0, kv_room // per_seq)
        phases = ("rollout",) if backend.sleep_mode else ("rollout", "update")
        note = f"{backend.gpu_memory_utilization} x {cfg.cluster.gpu_memory_gib:g} GiB"
        item = MemoryItem("vLLM engine (weights + KV cache)", share, phases, note)
        line = (
            f"vLLM: weights {gib(engine_weights)} GiB, KV cache room {gib(kv_room)} GiB = {fits} "
            f"sequences of {seq} tokens at once (this rank generates {local_seqs})"
        )
        if fits < 1:
            line += ": TOO SMALL, raise rollout.backend.gpu_memory_utilization"
        return [item], [line]
    together = min(rollout.generation_batch_size, local_seqs)
    kv = generate_kv_bytes(arch, b, together, seq)
    items = [MemoryItem("generate KV cache", kv, ("rollout",), f"{together} seqs x {seq} tokens")]
    gather = isinstance(backend, TransformersBackend) and backend.zero3_gather_for_generation
    if zero.stage == 3 and gather:
        items.append(MemoryItem("ZeRO-3 policy gathered for generate", params * b, ("rollout",)))
    return items, []


def build_plan(
    cfg: Config,
    arch: Architecture,
    world: WorldSize,
    prompt_tokens: int | None = None,
    response_tokens: int | None = None,
) -> MemoryPlan:
    """The plan of `cfg` on `world` ranks for a policy of shape `arch`. Sequence lengths
    default to the config's bounds (`data.max_prompt_tokens`, `rollout.max_new_tokens`); the
    trainer trims padding per micro-batch, so real prompts shorter than the bound need less."""
    batches = batch_plan(cfg, world.ranks)
    zero = zero_setup(cfg)
    b = value_bytes_of(cfg.model.dtype)
    ranks = world.ranks
    tp = prompt_tokens if prompt_tokens is not None else cfg.data.max_prompt_tokens
    tr = response_tokens if response_tokens is not None else cfg.rollout.max_new_tokens
    seq = tp + tr
    params = parameter_count(arch)
    items = model_state_items("policy", params, b, zero.stage, ranks, zero.offload)
    extra, extra_trained = extra_model_items(cfg, arch, zero, ranks, b)
    items += extra
    items += update_items(cfg, arch, zero, 1 + extra_trained, batches.micro_batch_size, seq, tr, b)
    generation, notes = rollout_items(cfg, arch, zero, batches.local_seqs, seq, b)
    items += generation
    gc = cfg.model.gradient_checkpointing
    other = activation_bytes(arch, b, batches.micro_batch_size * seq, not gc)
    cpu = offloaded_optimizer_bytes(params, b, ranks) * (1 + extra_trained) if zero.offload else 0
    if not gc:
        notes.append("gradient checkpointing is off (model.gradient_checkpointing)")
    return MemoryPlan(
        model=cfg.model.path,
        params=params,
        value_bytes=b,
        world=world,
        batches=batches,
        zero_stage=zero.stage,
        optimizer_offload=zero.offload,
        sequence_tokens=seq,
        items=tuple(items),
        activations_other=other,
        gpu_memory_bytes=int(cfg.cluster.gpu_memory_gib * GIB),
        cpu_offload_bytes=cpu,
        notes=tuple(notes),
    )


def gib(n_bytes: int) -> str:
    """`n_bytes` in GiB with one decimal."""
    return f"{n_bytes / GIB:.1f}"


def params_text(params: int) -> str:
    """A parameter count as `1.54B` or `0.6M`."""
    return f"{params / 1e9:.2f}B" if params >= 10**8 else f"{params / 1e6:.1f}M"


def render_plan(plan: MemoryPlan, cfg: Config) -> str:
    """The plan as text: world, batch split, memory table per GPU, totals, notes."""
    bp = plan.batches
    w = plan.world
    dtype = "bf16" if plan.value_bytes == 2 else "fp32"
    lines = [
        f"model: {plan.model} ({params_text(plan.params)} parameters, {dtype})",
        f"world: {w.ranks} rank{'s' if w.ranks > 1 else ''} on {w.nodes} node(s) (from {w.source})",
        f"deepspeed: {cfg.deepspeed.config}, ZeRO-{plan.zero_stage}"
        + (", optimizer offloaded to CPU" if plan.optimizer_offload else ""),
        "batch per step:",
        f"  prompts {cfg.rollout.prompts_per_step} x group {cfg.rollout.group_size} = "
        f"{cfg.rollout.prompts_per_step * cfg.rollout.group_size} samples; per rank "
        f"{bp.local_prompts} prompts = {bp.local_seqs} samples",
        f"  per rank: {cfg.algo.mini_batches} mini-batch(es) of {bp.mini_batch_seqs}, micro-batch "
        f"{bp.micro_batch_size}, gradient accumulation {bp.grad_accum_steps}; "
        f"{cfg.algo.epochs * cfg.algo.mini_batches} optimizer step(s) per RL step",
        f"  sequence: up to {cfg.data.max_prompt_tokens} prompt + {cfg.rollout.max_new_tokens} "
        f"response tokens",
        f"memory per GPU (GiB; {cfg.cluster.gpu_memory_gib:g} GiB GPU):",
        f"  {'item':<44} {'GiB':>7}  phase",
    ]
    for item in plan.items:
        phase = "both" if len(item.phases) == 2 else item.phases[0]
        note = f"  ({item.note})" if item.note else ""
        lines.append(f"  {item.name:<44} {gib(item.bytes):>7}  {phase}{note}")
    gc = cfg.model.gradient_checkpointing
    other_label = "no" if gc else "with"
    lines.append(
        f"  {'(activations ' + other_label + ' gradient checkpointing:':<44} "
        f"{gib(plan.activations_other):>7})"
    )
    rollout, update = plan.phase_bytes("rollout"), plan.phase_bytes("update")
    lines.append(f"  {'peak, rollout phase':<44} {gib(rollout):>7}")
    lines.append(f"  {'peak, update phase':<44} {gib(update):>7}")
    headroom = plan.gpu_memory_bytes - plan.peak_bytes
    verdict = "fits" if headroom > 0 else "DOES NOT FIT"
    lines.append(f"  {verdict}: headroom {gib(headroom)} GiB (CUDA context and NCCL not counted)")
    if plan.cpu_offload_bytes:
        cpu = gib(plan.cpu_offload_bytes)
        lines.append(f"  CPU memory per rank for the offloaded optimizer state: {cpu} GiB")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
