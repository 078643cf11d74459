"""Metrics sinks on rank 0: `<output_dir>/metrics.jsonl` (one object per step) and wandb.

wandb runs offline unless `WANDB_MODE` says otherwise; `WANDB_MODE=disabled` skips it.

Non-finite numbers are written as the strings "NaN", "Infinity" and "-Infinity" (strict JSON,
and `float()` of each gives the number back), never as null: a blown-up run shows as one.
`read_metrics_file` turns them back into floats.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""The marked strings metrics.jsonl holds for non-finite numbers."""


def encode_value(value: Any) -> Any:
    """A metric value for JSON: non-finite floats as their marked strings, others as given."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def decode_value(value: Any) -> Any:
    """Inverse of `encode_value`: a marked string back to its float."""
    return NON_FINITE[value] if isinstance(value, str) and value in NON_FINITE else value


def read_metrics_file(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, with non-finite values as floats again."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append({k: decode_value(v) for k, v in json.loads(line).items()})
    return rows


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
        marked = {key: encode_value(value) for key, value in row.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(marked, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.wandb_run is not None:  # wandb takes NaN and inf as numbers
            self.wandb_run.log(
                {k: v for k, v in row.items() if k != "step" and v is not None},
                step=int(row["step"]),
            )

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
