"""Write the built-in arithmetic task as GSM8K-style JSONL files for chat models.

    python launch/make_chat_data.py [--out data/arith_chat] [--train 2000] \\
        [--validation 256] [--eval 256] [--seed 0] [--task n_steps=3 --task modulus=7 ...]

Writes `<out>/{train,validation,eval}.jsonl`, one `{"question", "answer"}` object per line:
the question in words and a reference whose last line is `#### N` (see
rl/tasks/arith_chat.py). The splits are the task's own, so they are disjoint; the output is
deterministic in the arguments. `configs/quickstart_chat.yaml` trains on the committed
`data/arith_chat/` files, which are this script's output with the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl.tasks.arith import SPLITS, ArithConfig  # noqa: E402  (pure python)
from rl.tasks.arith_chat import gsm8k_rows  # noqa: E402

DEFAULT_ROWS = {"train": 2000, "validation": 256, "eval": 256}
"""Rows per split written by default."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/arith_chat", help="output directory")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_ROWS[split], help="rows")
    parser.add_argument("--seed", type=int, default=0, help="problem-sampling seed")
    parser.add_argument(
        "--task", action="append", default=[], metavar="KEY=INT", help="ArithConfig field"
    )
    return parser.parse_args(argv)


def task_config(pairs: list[str]) -> ArithConfig:
    """ArithConfig from KEY=VALUE strings (`ops` stays a string, the rest are integers)."""
    kwargs: dict[str, int | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --task {pair!r}: expected KEY=VALUE")
        kwargs[key] = value if key == "ops" else int(value)
    try:
        return ArithConfig(**kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: --task: {err}") from err


def write_split(path: Path, rows: list[dict[str, str]]) -> None:
    """One JSON object per line, keys in a fixed order."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = task_config(args.task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rows = gsm8k_rows(split, getattr(args, split), cfg, args.seed)
        write_split(out / f"{split}.jsonl", rows)
        print(f"{out / f'{split}.jsonl'}: {len(rows)} rows")


if __name__ == "__main__":
    main()
