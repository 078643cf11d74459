"""Deliberately broken reward heads for the bad-input tests (loaded by import path)."""

from __future__ import annotations

import torch

from rewards.heads import HeadBatch, HeadOutput, StatelessHead


class _Base(StatelessHead):
    granularity = "step"


class RaisingHead(_Base):
    name = "raising_head"

    def score(self, batch: HeadBatch) -> HeadOutput:
        raise RuntimeError("model server unreachable")


class NaNHead(_Base):
    """NaN on the last response token of rows 1 and 3."""

    name = "nan_head"

    def score(self, batch: HeadBatch) -> HeadOutput:
        rewards = torch.zeros(batch.batch_size, batch.response_length)
        last = batch.response_mask.sum(1).long() - 1  # [B]
        for row in (1, 3):
            rewards[row, last[row]] = float("nan")
        return HeadOutput(rewards)


class WrongShapeHead(_Base):
    name = "wrong_shape_head"

    def score(self, batch: HeadBatch) -> HeadOutput:
        return HeadOutput(torch.zeros(batch.batch_size, batch.response_length + 1))
