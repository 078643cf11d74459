"""Metrics sinks on rank 0: `<output_dir>/metrics.jsonl` (one object per step) and wandb.

wandb runs offline unless `WANDB_MODE` says otherwise; `WANDB_MODE=disabled` skips it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def truncate_after(path: Path, step: int) -> None:
    """Drop rows with `step` > `step` (rows a killed run wrote after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON row per step; mirrors it to wandb when enabled."""

    def __init__(
        self, output_dir: Path, *, use_wandb: bool, project: str, run_name: str, config: dict
    ) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb_run: Any = None
        if use_wandb and os.environ.get("WANDB_MODE", "offline") != "disabled":
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb_run = wandb.init(
                project=project, name=run_name, dir=str(output_dir), config=config
            )

    def log(self, row: dict[str, Any]) -> None:
        clean = {key: _clean(value) for key, value in row.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in clean.items() if k != "step" and v is not None},
                step=int(row["step"]),
            )

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
