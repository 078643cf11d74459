"""What every launch/ script shares: process defaults set before torch is imported, the
`--config` + dotted-overrides command line, and the error contract (a user error prints
`error: ...` and exits 2; a run that halted itself for a fault it names, `error: ...` and exit
3; anything else prints a one-line cause, then the traceback, and
exits 1). Imports nothing heavy at module level, so scripts can call it before torch loads.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn


def set_process_defaults(threads_per_rank: bool = True) -> None:
    """OMP threads (cores / ranks on this node, or all cores for one-process tools), the
    compiled-extension cache inside the environment, quiet tokenizers."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    cores = os.cpu_count() or 1
    threads = max(1, cores // ranks_here) if threads_per_rank else cores
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # compiled DeepSpeed ops are cached inside the environment, so they build once
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def config_parser(description: str | None) -> argparse.ArgumentParser:
    """`--config FILE [key=value ...]` (and the `--local_rank` the deepspeed launcher adds)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser


def guarded(body: Callable[[], Any]) -> int:
    """Run `body` under the error contract; returns the exit code."""
    from rl.core.errors import HaltError, UserError

    rank = os.environ.get("RANK", "0")
    try:
        body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except HaltError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    except Exception as err:  # a bug or an environment problem: one line first, then the trace
        hang = _explain_hang(err)
        if hang is not None:  # a collective timed out: name the rank it waited for
            print(f"error (rank {rank}): {hang}", file=sys.stderr, flush=True)
            return 3
        print(f"error (rank {rank}): {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        traceback.print_exc()
        return 1
    return 0


def _explain_hang(err: BaseException) -> str | None:
    """`rl.engine.watchdog.explain_hang`, when torch is loaded (it is, if a collective ran)."""
    if "rl.engine.watchdog" not in sys.modules:
        return None
    from rl.engine.watchdog import explain_hang

    return explain_hang(err)


def run_distributed_job(argv: list[str], description: str | None, job: Callable[..., Any]) -> int:
    """Parse `--config` + overrides, start the process group, run `job(cfg, dist)`, leave."""
    set_process_defaults()
    args = config_parser(description).parse_args(argv)

    def body() -> None:
        from rl.config import load_config
        from rl.engine.deepspeed_engine import init_distributed, shutdown

        cfg = load_config(args.config, args.overrides)
        dist = init_distributed(cfg.trainer.collective_timeout_s)
        job(cfg, dist)
        shutdown()

    return guarded(body)


def print_plan(argv: list[str], description: str | None) -> int:
    """`--dry-run`: load and check the config, print the batch split and the per-GPU memory
    plan (`rl.engine.memory_plan`) without reading model weights or starting DeepSpeed."""
    args = config_parser(description).parse_args(argv)

    def body() -> None:
        from rl.config import load_config
        from rl.engine.memory_plan import architecture_for, build_plan, plan_world_size, render_plan

        cfg = load_config(args.config, args.overrides)
        arch = architecture_for(cfg.model.path, cfg.model.tiny)
        plan = build_plan(cfg, arch, plan_world_size(cfg))
        print(f"dry run of {args.config}: nothing is loaded or started", flush=True)
        print(render_plan(plan, cfg), flush=True)

    return guarded(body)


def exit_process(code: int) -> NoReturn:
    """Exit a distributed job with `code`. After a clean run (code 0: every file closed,
    wandb finished, any vLLM engine shut down, the process group left) this skips the C++
    static destructors: a 2-rank CPU run sometimes aborted there ("terminate called without
    an active exception", exit -6) after all its output was written, which the launcher
    reports as a failed run. Code 3 (a run that halted itself: a hung peer, non-finite
    numbers) skips them too: the process group's teardown could wait on a stopped peer.
    Any other code runs the atexit handlers; it skips the teardown as well while a process
    group is still up (a user error raised mid-run leaves it up, and its teardown aborted the
    same way: exit 250 instead of 2), and otherwise exits normally."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code in (0, 3):
        os._exit(code)
    if _process_group_up():
        atexit._run_exitfuncs()  # what a normal exit runs before the teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _process_group_up() -> bool:
    """Whether this process still holds a torch.distributed process group."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()
