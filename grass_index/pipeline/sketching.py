"""Pass 1: the training set in fixed batches -> raw sketches, one committed store block per
batch (resumable at ``store.committed_blocks``)."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..capture import CaptureError
from .errors import AttributionError
from .record import batch_count

log = logging.getLogger("grass_index")


def batches(data: Sequence, batch_size: int, collate, start_block: int = 0):
    """Fixed block boundaries [b*B, (b+1)*B): a resumed build sees exactly the same batches."""
    n = len(data)
    for b in range(start_block, batch_count(n, batch_size)):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        yield b, lo, collate([data[i] for i in range(lo, hi)])


def batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_len(next(iter(batch.values())))
    return 1


def sketch_training_set(store, sketcher, train_data: Sequence, loss_fn, *, batch_size: int,
                        collate, progress, blocks: Sequence[int] | None = None,
                        fisher=None) -> None:
    """Sketch every batch not yet committed to ``store``; one block per batch.

    ``blocks`` are the global batch numbers this store holds, in order (default: all of them).
    A worker's shard holds ``range(i, n_batches, n)``: its local block j is global batch
    ``blocks[j]`` (same fixed boundaries, so the same rows), stored at local id ``j * batch_size``
    (every batch but the globally last one is full, and that one comes last).

    ``fisher`` (a ChunkedFisher) gets every committed block's rows: on a resume it first
    re-reads the blocks already committed, so its sums always match the store's blocks.
    """
    n = len(train_data)
    if blocks is None:
        blocks = range(batch_count(n, batch_size))
    start = store.committed_blocks
    if start:
        log.info("resuming: %d of %d batches already sketched", start, len(blocks))
    if fisher is not None and start < len(blocks):  # -- Fisher in pass 1 (streaming pass 2)
        for s, rows in store.iter_blocks():
            fisher.add(s, rows)
    progress("sketch", start, len(blocks))
    for j in range(start, len(blocks)):
        b = blocks[j]
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        batch = collate([train_data[i] for i in range(lo, hi)])
        try:
            rows = sketcher.sketch(batch, loss_fn)
        except CaptureError as e:
            if e.example is not None:
                raise AttributionError(
                    f"training example {lo + e.example} (train id; batch {b}): {e}") from e
            raise
        rows = rows.numpy()
        store.put_block(j, j * batch_size, rows)
        if fisher is not None:
            fisher.add(j * batch_size, rows)
        progress("sketch", j + 1, len(blocks))
