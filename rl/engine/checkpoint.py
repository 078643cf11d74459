"""Crash-safe DeepSpeed checkpoints with the trainer's own state and every rank's RNG.

Layout: `<output_dir>/checkpoints/step_00000010/` holds DeepSpeed's model/optimizer/
scheduler files, `trainer_state.json`, `rng_rank{r}.pt` and, written last, `COMPLETE`.
A checkpoint without `COMPLETE` (a crash mid-write) is never picked for resume, and
`latest` is only ever replaced atomically.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl.core.errors import ConfigError
from rl.engine.deepspeed_engine import barrier

COMPLETE = "COMPLETE"
TAG_PATTERN = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs under `root` that finished writing, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = TAG_PATTERN.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def save_checkpoint(
    engine: Any,
    root: Path,
    step: int,
    trainer_state: dict[str, Any],
    rank: int,
    keep: int,
    save_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save on every rank (collective); returns the checkpoint dir. `save_extra(path)`
    (collective) adds more state (reward heads, critic) before the dir is marked complete."""
    tag = tag_for(step)
    path = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    if save_extra is not None:
        save_extra(path)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    barrier()  # every rank's files are on disk
    if rank == 0:
        write_atomic(path / "trainer_state.json", json.dumps(trainer_state))
        write_atomic(path / COMPLETE, "")
        write_atomic(root / "latest", tag)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def load_checkpoint(engine: Any, path: Path, rank: int) -> dict[str, Any]:
    """Restore the engine and this rank's RNG from `path`; returns the trainer state."""
    if not (path / COMPLETE).is_file():
        raise ConfigError(
            f"trainer.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
        )
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    rng_file = path / f"rng_rank{rank}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    state: dict[str, Any] = json.loads((path / "trainer_state.json").read_text())
    return state
