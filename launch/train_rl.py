"""Train a policy with online RL.

    deepspeed --num_gpus 2 launch/train_rl.py --config configs/quickstart.yaml [key=value ...]
    torchrun --nproc_per_node 2 launch/train_rl.py --config ...
    python launch/train_rl.py --config ...            (one rank)

Overrides are dotted config keys, e.g. `trainer.max_steps=20 deepspeed.zero_stage=3`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path


def _set_process_defaults() -> None:
    """Thread count per rank and the extension cache; must run before torch is imported."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_here)))
    # compiled DeepSpeed ops are cached inside the environment, so they build once
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
        from rl.trainer import Trainer

        dist = init_distributed()
        Trainer(cfg, dist).fit()
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
