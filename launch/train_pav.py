"""Train a PAV verifier: Monte-Carlo value labels from the base policy, then a value model.

    deepspeed --num_gpus 2 launch/train_pav.py --config configs/quickstart_pav.yaml [key=value ...]
    python launch/train_pav.py --config configs/quickstart_pav.yaml          (one rank)

The `pav:` section drives it (rl/pav_train.py says what each step does); `model`, `data`,
`rollout`, `reward.functions[0]` (the verifier) and `deepspeed` are read as train_rl reads
them. A killed run restarted with the same command resumes data generation where it stopped.
The verifier is saved to `pav.output_dir`; use it with `reward.heads: [{head: pav, kwargs:
{path: <pav.output_dir>}}]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch/ itself, for train_rl
from train_rl import _set_process_defaults  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    _set_process_defaults()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from rl.errors import UserError

    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        from rl.config import load_config

        cfg = load_config(args.config, args.overrides)
        from rl.engine import init_distributed, shutdown
        from rl.pav_train import run

        dist = init_distributed()
        run(cfg, dist)
        shutdown()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # a bug or an environment problem: one line first, then the trace
        print(f"error (rank {rank}): {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
