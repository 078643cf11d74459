"""Train a PAV verifier: Monte-Carlo value labels from the base policy, then a value model.

    deepspeed --num_gpus 2 launch/train_pav.py --config configs/quickstart_pav.yaml [key=value ...]
    python launch/train_pav.py --config configs/quickstart_pav.yaml          (one rank)

The `pav:` section drives it (rl/pav/train.py says what each step does); `model`, `data`,
`rollout`, `reward.functions[0]` (the verifier) and `deepspeed` are read as train_rl reads
them. A killed run restarted with the same command resumes data generation where it stopped.
The verifier is saved to `pav.output_dir`; use it with `reward.heads: [{head: pav, kwargs:
{path: <pav.output_dir>}}]`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl.cli import exit_process, run_distributed_job  # noqa: E402  (imports no torch)


def train_pav(cfg: Any, dist: Any) -> None:
    from rl.pav.train import run

    run(cfg, dist)


if __name__ == "__main__":
    exit_process(run_distributed_job(sys.argv[1:], __doc__, train_pav))
