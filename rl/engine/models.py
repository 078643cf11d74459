"""Loading the policy (and reference) by hub name, local path, or the builtin tiny model."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from rl.config import Config
from rl.core.errors import ConfigError
from rl.engine.deepspeed_engine import DistInfo, zero3_init

BUILTIN_TINY = "builtin:arith-tiny"
BUILTIN_CHAT = "builtin:chat-tiny"
BUILTIN_MODELS: tuple[str, ...] = (BUILTIN_TINY, BUILTIN_CHAT)
"""`model.path` values that name a start model built locally (`rl.engine.start_model`)."""


def tiny_model_config(cfg: Config) -> Any:
    """The builtin model's `TinyModelConfig`: `model.tiny` overrides, trained on `data.task`."""
    from rl.engine.tiny_config import TinyModelConfig
    from rl.tasks.arith import ArithConfig

    valid = {f.name for f in fields(TinyModelConfig)} - {"task"}
    unknown = sorted(set(cfg.model.tiny) - valid)
    if unknown:
        raise ConfigError(f"unknown config key 'model.tiny.{unknown[0]}'; valid: {sorted(valid)}")
    try:
        task = ArithConfig(**cfg.data.task)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.task: {err}") from err
    tiny = TinyModelConfig(**cfg.model.tiny, task=task)
    try:
        tiny.demo_errors()
    except ValueError as err:
        raise ConfigError(f"model.tiny: {err}") from err
    arith_only = {"demo_step_error_rate", "demo_fact_error_rate", "demo_fact_error_use"}
    chosen = sorted(arith_only & set(cfg.model.tiny))
    if cfg.model.path == BUILTIN_CHAT and chosen:
        raise ConfigError(f"model.tiny.{chosen[0]}: only builtin:arith-tiny uses it")
    return tiny


def builtin_start_model(cfg: Config, dist: DistInfo, name: str = BUILTIN_TINY) -> Path:
    """Path of the SFT start model `name` (one of BUILTIN_MODELS): the shipped copy of its
    recipe, or a cached build; global rank 0 builds it, the others poll for it (not a
    barrier: a first build can outlast the process group's timeout). One builder for the
    whole job, not one per node: the build lock is an `flock`, which network filesystems
    may not honour, so `model.cache_dir` must be a directory every node sees. Rank 0
    prints which copy it is and whether its weights digest is the recorded one."""
    from rl.engine.start_model import describe, ensure_start_model, wait_for_start_model

    tiny = tiny_model_config(cfg)
    cache = Path(cfg.model.cache_dir)
    kind = name.removeprefix("builtin:")
    source = cfg.model.builtin_source
    if dist.rank == 0:
        path = ensure_start_model(cache, tiny, show_progress=dist.is_main, kind=kind, source=source)
    else:
        path = wait_for_start_model(cache, tiny, kind, source=source)
    if dist.is_main:
        line, as_recorded = describe(path)
        print(line if as_recorded else f"warning: {line}", flush=True)
    return path


def run_dtype(cfg: Config) -> torch.dtype:
    """The run's one dtype (`model.dtype`); ConfigError when the hardware lacks it."""
    from rl.engine.deepspeed_engine import use_bf16

    if not use_bf16(cfg.model.dtype):
        return torch.float32
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype=bfloat16: this GPU does not support bfloat16")
    return torch.bfloat16


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """`from_pretrained` keyword arguments every model of the run loads with."""
    kwargs: dict[str, Any] = {"dtype": run_dtype(cfg)}
    if cfg.model.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    return kwargs


def resolve_model_path(cfg: Config, dist: DistInfo) -> str:
    """`model.path`, with a builtin model built (or found in the cache) first; ConfigError
    for an unknown builtin or a local path that does not exist."""
    path = cfg.model.path
    if path in BUILTIN_MODELS:
        return str(builtin_start_model(cfg, dist, path))
    if path.startswith("builtin:"):
        valid = ", ".join(BUILTIN_MODELS)
        raise ConfigError(f"model.path: unknown builtin model {path!r}; valid: {valid}")
    local = Path(path)
    if (local.is_absolute() or path.startswith(".")) and not local.exists():
        raise ConfigError(f"model.path: {path} does not exist")
    return path


def load_policy(
    cfg: Config,
    dist: DistInfo,
    path: str | Path | None = None,
    ds_config: dict[str, Any] | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, resolved path) for `model.path` (or `path`), in the run's dtype,
    with gradient checkpointing when `model.gradient_checkpointing`; partitioned as it
    loads when `ds_config` is ZeRO-3 (see `zero3_init`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg, dist) if path is None else str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with zero3_init(ds_config):
            model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(cfg))
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"model.path: cannot load {path!r}: {str(err).splitlines()[0]}") from err
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, path


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (`model.gradient_checkpointing`), for any
    trained model: a Hugging Face model or a `ValueModel` (its backbone). Non-reentrant
    checkpointing, which also works when the inputs need no gradient."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
