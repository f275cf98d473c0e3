"""Pass 1: the training set in fixed batches -> raw sketches, one committed store block per
batch (resumable at ``store.committed_blocks``)."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from ..capture import CaptureError
from .errors import AttributionError

log = logging.getLogger("grass_index")


def _batches(data: Sequence, batch_size: int, collate, start_block: int = 0):
    """Fixed block boundaries [b*B, (b+1)*B): a resumed build sees exactly the same batches."""
    n = len(data)
    for b in range(start_block, math.ceil(n / batch_size)):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        yield b, lo, collate([data[i] for i in range(lo, hi)])


def _len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch:
        return _len(batch[0])
    if isinstance(batch, dict) and batch:
        return _len(next(iter(batch.values())))
    return 1


def _sketch_training_set(store, sketcher, train_data: Sequence, loss_fn, *, batch_size: int,
                         collate, progress) -> None:
    """Sketch every batch not yet committed to ``store``; one block per batch."""
    n_blocks = math.ceil(len(train_data) / batch_size)
    start = store.committed_blocks
    if start:
        log.info("resuming: %d of %d batches already sketched", start, n_blocks)
    progress("sketch", start, n_blocks)
    for b, lo, batch in _batches(train_data, batch_size, collate, start):
        try:
            rows = sketcher.sketch(batch, loss_fn)
        except CaptureError as e:
            if e.example is not None:
                raise AttributionError(
                    f"training example {lo + e.example} (train id; batch {b}): {e}") from e
            raise
        store.put_block(b, lo, rows.numpy())
        progress("sketch", b + 1, n_blocks)
