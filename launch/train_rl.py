"""Train a policy with online RL.

    deepspeed --num_gpus 2 launch/train_rl.py --config configs/quickstart.yaml [key=value ...]
    torchrun --nproc_per_node 2 launch/train_rl.py --config ...
    python launch/train_rl.py --config ...            (one rank)
    python launch/train_rl.py --config X --dry-run    (check X, print the batch split and
                                                       the per-GPU memory plan; nothing runs)

Overrides are dotted config keys, e.g. `trainer.max_steps=20 deepspeed.zero_stage=3`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl.cli import exit_process, print_plan, run_distributed_job  # noqa: E402  (no torch)


def train(cfg: Any, dist: Any) -> None:
    from rl.trainer.loop import Trainer

    Trainer(cfg, dist).fit()


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--dry-run" in argv:
        exit_process(print_plan([a for a in argv if a != "--dry-run"], __doc__))
    exit_process(run_distributed_job(argv, __doc__, train))
