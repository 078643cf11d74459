from __future__ import annotations

import json
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


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint dir with two files, marked complete with its manifest."""
    from rl.engine.checkpoint import write_complete

    path = root / tag_for(step)
    (path / "sub").mkdir(parents=True)
    (path / "model.pt").write_bytes(b"x" * 100)
    (path / "sub" / "optim.pt").write_bytes(b"y" * 10)
    write_complete(path)
    return path


def test_manifest_records_sizes_and_damage_names_the_file(tmp_path: Path):
    from rl.engine.checkpoint import damage

    path = _fake_checkpoint(tmp_path, 1)
    assert json.loads((path / COMPLETE).read_text()) == {
        "files": {"model.pt": 100, "sub/optim.pt": 10}
    }
    assert damage(path) is None
    (path / "model.pt").write_bytes(b"x" * 50)
    assert damage(path) == f"{path / 'model.pt'} is 50 bytes, COMPLETE recorded 100"
    (path / "sub" / "optim.pt").unlink()
    (path / "model.pt").write_bytes(b"x" * 100)
    assert damage(path) == f"{path / 'sub' / 'optim.pt'} is missing"
    legacy = tmp_path / tag_for(9)
    legacy.mkdir()
    (legacy / COMPLETE).touch()
    assert damage(legacy) is None  # written before manifests: accepted unchecked


def test_latest_skips_a_damaged_newest_with_a_warning(tmp_path: Path, capsys):
    _fake_checkpoint(tmp_path, 1)
    good = _fake_checkpoint(tmp_path, 2)
    bad = _fake_checkpoint(tmp_path, 3)
    (bad / "sub" / "optim.pt").write_bytes(b"y")
    assert latest_checkpoint(tmp_path) == good
    err = capsys.readouterr().err
    assert err.startswith(
        f"warning: skipping damaged checkpoint {tag_for(3)}: {bad / 'sub' / 'optim.pt'} is 1 "
        "bytes, COMPLETE recorded 10"
    )


def test_prune_never_deletes_the_newest_intact_checkpoint(tmp_path: Path):
    from rl.engine.checkpoint import prune

    paths = [_fake_checkpoint(tmp_path, s) for s in (1, 2, 3)]
    (paths[2] / "model.pt").unlink()  # the newest is damaged
    deleted = prune(tmp_path, keep=1)
    assert deleted == [paths[0]]  # step 2, the newest intact one, stays
    assert latest_checkpoint(tmp_path, warn=False) == paths[1]
    assert prune(tmp_path, keep=0) == []
