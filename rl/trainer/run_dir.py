"""A run directory holds one run: a new run never appends to, or resumes from, another's files.

`trainer.resume=none` into an `output_dir` that already holds a run (metrics, checkpoints or a
final model) is refused, unless `trainer.overwrite=true`, which clears the directory first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rl.core.errors import ConfigError
from rl.engine import deepspeed_engine as eng

RUN_FILES = ("metrics.jsonl", "checkpoints", "final")
"""Entries that mark a directory as holding a run."""


def earlier_run_files(output_dir: Path) -> list[str]:
    """The run entries present in `output_dir` (an empty checkpoints/ does not count)."""
    found = []
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def prepare_output_dir(output_dir: Path, resume: str, overwrite: bool, dist: eng.DistInfo) -> None:
    """Refuse (or, with `overwrite`, clear) an `output_dir` holding an earlier run when this
    run starts fresh (`resume=none`). Collective: rank 0 looks and decides for every rank
    (another rank listing the directory while rank 0 deletes it could see half of it, and
    ranks that disagree would leave one raising and the others waiting); every rank has
    passed the decision before rank 0 deletes, and waits until it has."""
    if resume != "none":
        return
    found = eng.broadcast_object(earlier_run_files(output_dir) if dist.is_main else None)
    if found and not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} already holds a run ({', '.join(found)}); continue it with "
            "trainer.resume=auto, or start over with trainer.overwrite=true (deletes it)"
        )
    if found:
        eng.barrier()
        if dist.is_main:
            shutil.rmtree(output_dir)
    eng.barrier()
