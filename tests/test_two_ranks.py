"""Collective helpers on two gloo ranks of this machine: the shared-directory check (once
seeing the same directory, once each its own, as two nodes without a shared filesystem
would), the broadcast that makes every rank resume from rank 0's choice, rank 0's decision
about an earlier run in `output_dir`, and the tensor-parallel prompt gathering of the vLLM
backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from rl.core.errors import ConfigError
from rl.engine.deepspeed_engine import DistInfo
from rl.setup import check_shared_dir


def _rank(rank: int, init_file: str, dirs: list[str], errors: dict[int, str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        check_shared_dir(Path(dirs[rank]), DistInfo(rank, 2, rank))
        errors[rank] = ""
    except ConfigError as err:
        errors[rank] = str(err)
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, dirs: list[str]) -> dict[int, str]:
    errors = mp.Manager().dict()
    init_file = str(tmp_path / "init")
    mp.spawn(_rank, args=(init_file, dirs, errors), nprocs=2, join=True)
    return dict(errors)


@pytest.mark.parametrize("shared", [True, False])
def test_check_shared_dir(tmp_path: Path, shared: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    dirs = [str(run), str(run)] if shared else [str(run), str(tmp_path / "other")]
    errors = _run(tmp_path, dirs)
    if shared:
        assert errors == {0: "", 1: ""}
        assert list(run.iterdir()) == []  # the probe file is gone
    else:
        for message in errors.values():  # every rank stops, with the same message
            assert "is not shared by every rank (rank 1 cannot see" in message


def _tp_rank(rank: int, init_file: str, out: dict[int, object]) -> None:
    from rl.engine.deepspeed_engine import broadcast_object
    from rl.rollout.vllm_backend import gather_group_prompts, tensor_parallel_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        group = tensor_parallel_group(2)
        mine = [[rank, 1], [rank, 2]] if rank == 0 else [[rank, 3]]
        prompts, cut = gather_group_prompts(mine, group)
        chosen = broadcast_object(f"checkpoint of rank {rank}")
        try:
            tensor_parallel_group(3)
            too_big = ""
        except ConfigError as err:
            too_big = str(err)
        out[rank] = (prompts, prompts[cut] == mine, chosen, too_big)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_prompts_and_broadcast(tmp_path: Path) -> None:
    out = mp.Manager().dict()
    mp.spawn(_tp_rank, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        prompts, own_slice, chosen, too_big = out[rank]
        assert prompts == [[0, 1], [0, 2], [1, 3]]  # the same list, in rank order, on both
        assert own_slice  # each rank gets its own prompts' outputs back
        assert chosen == "checkpoint of rank 0"
        assert "rollout.backend.tensor_parallel_size=3 does not divide the 2 ranks" in too_big


def _overwrite_rank(
    rank: int, init_file: str, dirs: list[str], overwrite: bool, errors: dict[int, str]
) -> None:
    from datetime import timedelta

    from rl.trainer.run_dir import prepare_output_dir

    # a short timeout: ranks that disagree would otherwise wait for each other for 30 min
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=20),
    )
    try:
        prepare_output_dir(Path(dirs[rank]), "none", overwrite, DistInfo(rank, 2, rank))
        errors[rank] = ""
    except ConfigError as err:
        errors[rank] = str(err)
    except RuntimeError as err:  # a collective that timed out
        errors[rank] = f"hung: {type(err).__name__}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overwrite", [False, True])
def test_rank_zero_decides_about_an_earlier_run(tmp_path: Path, overwrite: bool) -> None:
    """Rank 1 sees the run directory without the earlier run (as when it lists it after rank
    0 began deleting it): every rank follows rank 0's view, so without `overwrite` both stop
    with the same message, and with it rank 0 deletes its directory and both go on."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    earlier = tmp_path / "run"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "step_00000002").write_text("")
    (earlier / "metrics.jsonl").write_text("{}\n")
    empty = tmp_path / "seen_by_rank_1"
    empty.mkdir()
    errors = mp.Manager().dict()
    args = (str(tmp_path / "init"), [str(earlier), str(empty)], overwrite, errors)
    mp.spawn(_overwrite_rank, args=args, nprocs=2, join=True)
    if overwrite:
        assert dict(errors) == {0: "", 1: ""}
        assert not earlier.exists()
    else:
        for message in errors.values():
            assert "already holds a run (metrics.jsonl, checkpoints)" in message, message
        assert (earlier / "metrics.jsonl").exists()
