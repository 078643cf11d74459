"""Run setup shared by the trainer and the PAV pipeline: seeding, the prepared prompt rows of
a configured source, and the configured rollout backend."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl.config import Config
from rl.core.errors import ConfigError
from rl.data.prompts import PromptRow, load_rows, prepare_prompts
from rl.engine import deepspeed_engine as eng
from rl.engine.deepspeed_engine import DistInfo
from rl.engine.models import run_dtype
from rl.rollout.backend import (
    DecodingSettings,
    RolloutBackend,
    SamplingSettings,
    TransformersRollout,
    unique_ids,
)
from rl.rollout.backend_specs import TransformersBackend, VLLMBackend

BUILTIN_TRAIN_ROWS = 20000
"""Training rows drawn from a builtin task when `data.train_size` is not set."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prompt_rows(cfg: Config, tokenizer: Any, which: str) -> tuple[list[PromptRow], int]:
    """The prepared rows of `data.train` (`which="train"`) or `data.eval` (`"eval"`), and how
    many were skipped as too long."""
    data = cfg.data
    if which == "train":
        source, split, n, seed = data.train, data.train_split, data.train_size, cfg.seed
        if n is None and source.startswith("builtin:"):
            n = BUILTIN_TRAIN_ROWS
    else:
        source, split, n, seed = data.eval, data.eval_split, data.eval_size, data.eval_seed
    rows = load_rows(source, split=split, n=n, seed=seed, task_kwargs=data.task)
    return prepare_prompts(
        rows,
        tokenizer,
        source=source,
        prompt_column=data.prompt_column,
        answer_column=data.answer_column,
        max_prompt_tokens=data.max_prompt_tokens,
        apply_chat_template=data.apply_chat_template,
    )


COMPILED_PROMPT_MULTIPLE = 64
"""With compiled decoding, prompts are left-padded to a multiple of this many tokens: a few
shapes, each compiled once, and little padding."""


def make_rollout(
    cfg: Config, tokenizer: Any, model_path: str, policy: Any, dist: DistInfo, zero_stage: int
) -> RolloutBackend:
    """The configured generation backend (a vLLM engine is created on every rank at once)."""
    rollout, backend = cfg.rollout, cfg.rollout.backend
    stop_ids = stop_token_ids(cfg, tokenizer, policy)
    if isinstance(backend, TransformersBackend):
        gather = zero_stage == 3 and backend.zero3_gather_for_generation
        decoding = DecodingSettings(
            cache=backend.cache,
            compile=backend.compile,
            prompt_multiple=COMPILED_PROMPT_MULTIPLE if backend.compile else 1,
        )
        return TransformersRollout(
            tokenizer,
            rollout.generation_batch_size,
            synced_gpus=zero_stage == 3,
            stop_token_ids=stop_ids,
            gather=eng.gathered_parameters if gather else None,
            decoding=decoding,
        )
    from rl.rollout.vllm_backend import VLLMRollout

    assert isinstance(backend, VLLMBackend)  # the only other variant
    max_len = backend.max_model_len or min(
        cfg.data.max_prompt_tokens + rollout.max_new_tokens, max_positions(policy)
    )
    return VLLMRollout(
        tokenizer,
        model_path,
        seed=cfg.seed * 1000 + dist.rank // backend.tensor_parallel_size,  # one per engine
        max_model_len=max_len,
        tensor_parallel_size=backend.tensor_parallel_size,
        gpu_memory_utilization=backend.gpu_memory_utilization,
        kv_cache_gib=backend.kv_cache_gib,
        sleep_mode=backend.sleep_mode,
        dtype=str(run_dtype(cfg)).removeprefix("torch."),
        stop_token_ids=stop_ids,
        log=print if dist.is_main else (lambda *_: None),
        enforce_eager=backend.enforce_eager,
        max_num_seqs=backend.max_num_seqs,
    )


def training_sampling(cfg: Config) -> SamplingSettings:
    """How training rollouts sample: exactly the `rollout` settings."""
    r = cfg.rollout
    return SamplingSettings(r.max_new_tokens, r.temperature, r.top_p, top_k=r.top_k)


def stop_token_ids(cfg: Config, tokenizer: Any, policy: Any) -> list[int]:
    """Ids that end a response besides the tokenizer's EOS: the EOS ids of the checkpoint's
    generation config, then `rollout.stop_token_ids`; ConfigError for an id outside the
    vocabulary."""
    generation = getattr(policy, "generation_config", None)
    ids = unique_ids(getattr(generation, "eos_token_id", None), cfg.rollout.stop_token_ids)
    vocab = len(tokenizer)
    for token in cfg.rollout.stop_token_ids:
        if not 0 <= token < vocab:
            raise ConfigError(
                f"rollout.stop_token_ids: {token} is outside the vocabulary (0..{vocab - 1})"
            )
    return ids


def max_positions(model: Any) -> int:
    """The model's context length (`max_position_embeddings`; huge when it sets none)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 10**9)


def check_shared_dir(directory: Path, dist: DistInfo, what: str = "output_dir") -> None:
    """ConfigError unless every rank sees a file rank 0 writes into `directory`: checkpoints
    (and the PAV pipeline's data) are written by several ranks into one directory, which
    across nodes needs a shared filesystem. Collective; a no-op for one rank."""
    if dist.world_size == 1:
        return
    name = f".shared-check-{uuid.uuid4().hex}" if dist.is_main else None
    name = eng.broadcast_object(name)
    probe = directory / name
    if dist.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    eng.barrier()
    missing = eng.all_reduce_max(torch.tensor([0.0 if probe.exists() else float(dist.rank + 1)]))
    eng.barrier()
    if dist.is_main:
        probe.unlink(missing_ok=True)
    if missing.item() > 0:
        raise ConfigError(
            f"{what} {directory} is not shared by every rank (rank {int(missing.item()) - 1} "
            "cannot see files rank 0 writes there): on several nodes, point it at a shared "
            "filesystem"
        )
