from __future__ import annotations

from pathlib import Path

import torch

from rl.core.types import position_ids_from_mask
from rl.engine.checkpoint import COMPLETE, latest_checkpoint, tag_for, write_atomic
from rl.rollout.backend import left_pad, response_mask_until_eos
from rl.trainer.metrics import truncate_after


def test_latest_checkpoint_ignores_half_written(tmp_path: Path):
    for step in (2, 4, 6):
        (tmp_path / tag_for(step)).mkdir()
    (tmp_path / tag_for(2) / COMPLETE).touch()
    (tmp_path / tag_for(4) / COMPLETE).touch()
    # step 6 crashed mid-write: no COMPLETE marker
    assert latest_checkpoint(tmp_path) == tmp_path / tag_for(4)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_write_atomic_replaces(tmp_path: Path):
    target = tmp_path / "latest"
    write_atomic(target, "a")
    write_atomic(target, "b")
    assert target.read_text() == "b"
    assert not (tmp_path / "latest.tmp").exists()


def test_truncate_after_drops_rows_past_checkpoint(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}}}\n' for s in range(5)))
    truncate_after(path, 2)
    assert path.read_text().splitlines() == ['{"step": 0}', '{"step": 1}', '{"step": 2}']


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_response_mask_keeps_tokens_up_to_first_eos():
    eos = 2
    responses = torch.tensor([[5, 6, eos, 0, 0], [5, eos, 7, eos, 0], [5, 6, 7, 8, 9]])
    mask = response_mask_until_eos(responses, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
