"""Train a discriminative PRM on a step-label dataset (optionally buying only part of the labels).

    deepspeed --num_gpus 2 launch/train_prm.py --config configs/quickstart.yaml \
        prm.data=steps.jsonl [key=value ...]
    python launch/train_prm.py --config configs/quickstart.yaml prm.data=steps.jsonl  (one rank)

The `prm:` section drives it (rl/prm/train.py says what each step does; rl/prm/active.py the
active selection with `prm.budget_frac` < 1); `model` (the policy the PRM starts from),
`optim` (betas, weight decay, clipping) and `deepspeed` are read as train_rl reads them. The
PRM is saved to `prm.output_dir` with its convention (`prm_convention.json`) and
`train_prm_metrics.json`; use it with `rl.prm.model.load_prm(<prm.output_dir>)`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl.cli import exit_process, run_distributed_job  # noqa: E402  (imports no torch)


def train_prm(cfg: Any, dist: Any) -> None:
    from rl.prm.train import run

    run(cfg, dist)


if __name__ == "__main__":
    exit_process(run_distributed_job(sys.argv[1:], __doc__, train_prm))
