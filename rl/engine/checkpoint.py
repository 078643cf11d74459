"""Crash-safe DeepSpeed checkpoints with the trainer's own state and every rank's RNG.

Layout: `<output_dir>/checkpoints/step_00000010/` holds DeepSpeed's model/optimizer/
scheduler files, `trainer_state.json`, `rng_rank{r}.pt` and, written last, `COMPLETE`.
A checkpoint without `COMPLETE` (a crash mid-write) is never picked for resume, and
`latest` is only ever replaced atomically.

`COMPLETE` holds a manifest: every other file of the checkpoint with its size in bytes. At
resume a checkpoint whose files are missing or of another size (a disk that filled up, a
copy cut short) is skipped for the previous complete one, with a warning naming the file;
`keep_checkpoints` pruning never deletes the newest intact checkpoint. Sizes, not checksums:
they catch truncation and loss at the cost of one `stat` per file, where hashing a large
model's shards would add minutes to every save. An empty `COMPLETE` (written before the
manifest existed) is accepted unchecked.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
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


def checkpoint_dir(root: Path, step: int) -> Path:
    """Where step `step`'s checkpoint lives under `root`."""
    return root / tag_for(step)


def manifest(path: Path) -> dict[str, int]:
    """Every file under checkpoint dir `path` but `COMPLETE`: {relative path: size in bytes}."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE)
    return {str(p.relative_to(path)): p.stat().st_size for p in files}


def write_complete(path: Path) -> None:
    """Mark `path` complete, recording its manifest (after every file is on disk)."""
    write_atomic(path / COMPLETE, json.dumps({"files": manifest(path)}, indent=0))


def damage(path: Path) -> str | None:
    """None when the complete checkpoint `path` has every file its manifest records, at the
    recorded size; else what is wrong, naming the file."""
    text = (path / COMPLETE).read_text().strip()
    if not text:
        return None  # written before manifests existed
    try:
        recorded: dict[str, int] = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{path / COMPLETE} is not a readable manifest"
    for name, size in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} is {actual} bytes, {COMPLETE} recorded {size}"
    return None


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


def latest_checkpoint(root: Path, warn: bool = True) -> Path | None:
    """The newest complete, intact checkpoint under `root` (None if there is none). A damaged
    one is passed over for the one before, with a warning on stderr naming the file."""
    for path in reversed(complete_checkpoints(root)):
        problem = damage(path)
        if problem is None:
            return path
        if warn:
            print(
                f"warning: skipping damaged checkpoint {path.name}: {problem}; "
                "trying the previous complete one",
                file=sys.stderr,
                flush=True,
            )
    return None


def prune(root: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep` (0 keeps all), but never one
    of the newest `keep` intact ones: with the newest damaged, the previous good one stays.
    Returns the deleted dirs."""
    if keep <= 0:
        return []
    done = complete_checkpoints(root)
    intact = [path for path in done if damage(path) is None]
    protected = set(intact[-keep:])
    deleted = [path for path in done[:-keep] if path not in protected]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


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
        write_complete(path)
        write_atomic(root / "latest", tag)
        prune(root, keep)
    barrier()
    return path


def load_checkpoint(engine: Any, path: Path, rank: int) -> dict[str, Any]:
    """Restore the engine and this rank's RNG from `path`; returns the trainer state."""
    if not (path / COMPLETE).is_file():
        raise ConfigError(
            f"trainer.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
        )
    problem = damage(path)
    if problem is not None:
        raise ConfigError(f"trainer.resume: checkpoint {path} is damaged: {problem}")
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    rng_file = path / f"rng_rank{rank}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    state: dict[str, Any] = json.loads((path / "trainer_state.json").read_text())
    return state
