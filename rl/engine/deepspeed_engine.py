"""The only module that touches DeepSpeed and torch.distributed.

Initialises the process group (gloo on CPU, NCCL on GPUs, as DeepSpeed's accelerator
picks), wraps the policy with `deepspeed.initialize` (ZeRO 0/1/2/3, gradient
accumulation, bf16 where the hardware has it), holds the frozen reference model, and
offers the few collectives the trainer needs.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rl.core.errors import ConfigError
from rl.engine import watchdog
from rl.engine.op_locks import watch_op_builds


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join the job's process group; a plain `python` run becomes a world of one. With
    `timeout_s`, collectives that wait longer fail, and a heartbeat thread names a rank that
    stops answering (`rl.engine.watchdog`)."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # plain `python launch/train_rl.py`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if get_accelerator().device_name() != "cpu":  # one GPU per rank, before any CUDA work
        get_accelerator().set_device(local_rank)
    extra = {} if timeout_s is None else {"timeout": watchdog.pg_timeout(timeout_s)}
    with watch_op_builds():  # JIT-builds deepspeed_shm_comm on CPU; see op_locks
        deepspeed.init_distributed(**extra)
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    if timeout_s is not None:
        watchdog.start(info.rank, info.world_size, timeout_s)
    return info


def shutdown() -> None:
    """Leave the process group cleanly (avoids gloo's abort-on-exit noise); a no-op when a
    vLLM engine's shutdown already destroyed it. Also removes this rank's DeepSpeed CPU
    all-reduce buffer from /dev/shm, which DeepSpeed never unlinks (66 MiB per rank)."""
    watchdog.stop()
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.barrier()  # every rank has mapped every buffer long ago; unlinking is safe now
        remove_shm_buffer(rank)
        dist.destroy_process_group()


def shm_buffer_path(rank: int) -> Path:
    """/dev/shm name of DeepSpeed's CPU all-reduce workspace for `rank` (deepspeed 0.19
    csrc/cpu/comm/shm.cpp: `deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`)."""
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def remove_shm_buffer(rank: int) -> None:
    """Unlink this rank's buffer name (mappings stay valid until the processes exit)."""
    try:
        shm_buffer_path(rank).unlink(missing_ok=True)
    except OSError:
        pass


def use_bf16(dtype: str) -> bool:
    """bf16 for `auto` on GPUs that support it; fp32 on CPU."""
    if dtype == "bfloat16":
        return True
    if dtype == "float32":
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def build_ds_config(
    path: str,
    *,
    zero_stage: int | None,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    max_grad_norm: float,
    bf16: bool,
) -> dict[str, Any]:
    """DeepSpeed config from the JSON at `path`, with batch sizes filled in by the trainer."""
    json_path = Path(path)
    if not json_path.is_file():
        raise ConfigError(f"deepspeed.config: file not found: {path}")
    ds: dict[str, Any] = json.loads(json_path.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "optimizer"):
        if key in ds:
            raise ConfigError(
                f"{path}: remove {key!r}; batch sizes come from trainer/rollout settings and the "
                "optimizer from the `optim` section"
            )
    zero = dict(ds.get("zero_optimization", {}))
    if zero_stage is not None:
        zero["stage"] = zero_stage
    ds["zero_optimization"] = zero
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = grad_accum_steps
    ds["train_batch_size"] = micro_batch_size * grad_accum_steps * world_size
    ds["gradient_clipping"] = max_grad_norm
    ds["bf16"] = {"enabled": bf16}
    # A torch optimizer is passed in (see `make_adamw`), which ZeRO calls untested.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage_of(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


@contextmanager
def zero3_init(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Under ZeRO-3, `from_pretrained` inside this block builds the model partitioned over
    the ranks as it loads (transformers' HfDeepSpeedConfig turns on `deepspeed.zero.Init`)
    instead of whole on every rank; a no-op otherwise. Only for models that go straight
    into a ZeRO-3 engine: modules created inside are partitioned too."""
    if ds_config is None or zero_stage_of(ds_config) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    marker = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del marker


@contextmanager
def gathered_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Every ZeRO-3 partitioned parameter of `model` whole on every rank inside the block
    (read-only; collective: every rank must enter it). The whole model must fit."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield


def create_policy_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    warmup_steps: int,
) -> Any:
    """Wrap `model` in a DeepSpeed engine with AdamW (see `make_adamw`) and a linear
    warm-up, constant schedule."""
    import deepspeed

    optimizer = make_adamw(model, ds_config, lr=lr, betas=betas, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """True when the config puts the optimizer state on the CPU (ZeRO-Offload)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") == "cpu"


def make_adamw(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
) -> torch.optim.Optimizer:
    """Decoupled-weight-decay Adam for the engine: DeepSpeed's CPU Adam when the optimizer
    is offloaded (DeepSpeed refuses a torch optimizer there), else torch's AdamW, fused
    on GPUs. Both compute AdamW.

    torch's fused kernel rather than DeepSpeed's FusedAdam on GPUs: that one is compiled
    with nvcc on first use, which needs a CUDA toolkit beside torch's wheels and, in
    DeepSpeed 0.19.8, fails outright when TORCH_CUDA_ARCH_LIST names an arch such as
    `9.0a` (seen on an H200 image)."""
    from deepspeed.accelerator import get_accelerator

    params = [p for p in model.parameters() if p.requires_grad]
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        with watch_op_builds():  # JIT-builds cpu_adam
            return DeepSpeedCPUAdam(
                params, lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=True
            )  # fmt: skip
    fused = get_accelerator().device_name() == "cuda"
    return FiniteAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients hold a NaN or inf, and says so in `overflow`.

    DeepSpeed's ZeRO optimizers (stages 1-3) and its bf16 optimizer check the reduced
    gradients themselves and never call `step` on non-finite ones; plain fp32 without ZeRO
    (stage 0) calls this optimizer directly and reads `overflow` afterwards, counting the
    step as skipped (`engine.was_step_applied()` is False, the LR schedule does not advance).
    The gradients are already all-reduced there, so every rank takes the same decision."""

    overflow: bool = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        finite = all(bool(torch.isfinite(n)) for n in torch._foreach_norm(grads)) if grads else True
        self.overflow = not finite
        if self.overflow:
            return None
        return super().step(closure)


def step_applied(engine: Any) -> bool:
    """Whether the engine's last optimizer step changed the weights (False when DeepSpeed
    skipped it for non-finite gradients; the decision is the same on every rank)."""
    return bool(engine.was_step_applied())


def create_reference(
    model: torch.nn.Module, ds_config: dict[str, Any], offload: bool = False
) -> torch.nn.Module:
    """Frozen reference: partitioned by a ZeRO-3 inference engine under ZeRO-3 (with
    `offload`, its partitions live in CPU memory and are fetched as layers run), else a
    whole copy on this rank's device."""
    model.eval()
    model.requires_grad_(False)
    if zero_stage_of(ds_config) != 3:
        if offload:
            raise ConfigError("model.offload_references needs ZeRO-3 (deepspeed.zero_stage=3)")
        return model.to(accelerator_device())
    import deepspeed

    ref_config: dict[str, Any] = {
        key: ds_config[key]
        for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "bf16")
        if key in ds_config
    }
    ref_config["gradient_accumulation_steps"] = ds_config["gradient_accumulation_steps"]
    ref_config["zero_optimization"] = {"stage": 3}
    if offload:
        ref_config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ref_config)
    engine.eval()
    return engine.module


def accelerator_device() -> torch.device:
    """This rank's device as DeepSpeed's accelerator names it (cuda:<local rank>, or cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _all_reduce(values: torch.Tensor, op: Any) -> torch.Tensor:
    """`values` reduced over all ranks, as a new tensor on `values`' device. The reduction
    runs on the accelerator's device (NCCL takes only GPU tensors; gloo only CPU ones)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values.detach().clone()
    out = values.detach().to(accelerator_device(), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(values.device)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (returns a new tensor; float64 kept as given)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise max of a tensor over all ranks (returns a new tensor)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (picklable objects; a no-op without a group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=accelerator_device())
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (picklable objects; `[value]`
    without a group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The policy's full weights on rank 0 (None elsewhere); gathered layer by layer under ZeRO-3.

    Must be called on every rank.
    """
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
        return dict(state) if state is not None else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_hf_model(engine: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write the policy in Hugging Face format (model + tokenizer) to `out_dir` from rank 0."""
    state = full_state_dict(engine)
    if state is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        engine.module.save_pretrained(out_dir, state_dict=state)
        tokenizer.save_pretrained(out_dir)
    barrier()
