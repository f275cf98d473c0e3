"""Pass 1: the training set in fixed batches -> raw sketches, one committed store block per
batch (resumable at ``store.committed_blocks``).

Batches are read and collated by a torch DataLoader's worker processes ahead of the sketching
(``workers``), in the fixed order: store block j is always global batch ``blocks[j]``, examples
[b·B, (b+1)·B), whatever the worker count, so the sketches are the same bit for bit."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from ..errors import option, spelled
from ..capture import CaptureError
from ..precondition.fisher import layer_slices
from ..store import StoreError
from ..calls import TaskError, collate_items
from ..indexdir.errors import AttributionError
from .factors import Pass1Factors
from ..indexdir.fingerprints import block_digest, first_difference
from ..batching import batch_count

log = logging.getLogger("grass_index")


def default_workers() -> int:
    """Collating workers when none are asked for: none on a machine of 2 cores or fewer (a
    worker would take a core from the model), else one per 4 cores, at most 2."""
    return min(2, (os.cpu_count() or 1) // 4)


class BlockBatches(torch.utils.data.Dataset):
    """Item j: (j, lo, hi, data digest, collated batch) of store block j, or (j, lo, hi, None,
    the exception) when reading or collating its examples failed — raised by the building
    process, so the error is the one line the data's code gave, not a worker's traceback."""

    def __init__(self, data: Sequence, blocks: Sequence[int], batch_size: int, collate):
        self.data, self.blocks, self.batch_size, self.collate = data, blocks, batch_size, collate

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, j: int):
        b, n = self.blocks[j], len(self.data)
        lo, hi = b * self.batch_size, min(n, (b + 1) * self.batch_size)
        try:
            items = [self.data[i] for i in range(lo, hi)]
            return j, lo, hi, block_digest(items), collate_items(
                self.collate, items, f"training examples {lo}..{hi - 1}")
        except Exception as e:  # noqa: BLE001 -- handed to the building process as is
            return j, lo, hi, None, e


def block_batches(data: Sequence, blocks: Sequence[int], batch_size: int, collate, start: int,
                  workers: int | None):
    """Blocks start.. of ``blocks`` in order, as BlockBatches items: read by ``workers``
    DataLoader processes ahead of their use (0: in this process)."""
    ds = BlockBatches(data, blocks, batch_size, collate)
    workers = default_workers() if workers is None else workers
    order = range(start, len(blocks))
    if workers == 0 or len(order) <= 1:
        yield from (ds[j] for j in order)
        return
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=order, num_workers=workers,
                                         prefetch_factor=2, persistent_workers=False)
    yield from loader


def sketch_training_set(store, sketcher, train_data: Sequence, loss_fn, *, batch_size: int,
                        collate, progress, blocks: Sequence[int] | None = None,
                        fisher=None, factors: dict | None = None,
                        workers: int | None = 0) -> None:
    """Sketch every batch not yet committed to ``store``; one block per batch.

    ``blocks`` are the global batch numbers this store holds, in order (default: all of them).
    A worker's shard holds ``range(i, n_batches, n)``: its local block j is global batch
    ``blocks[j]`` (same fixed boundaries, so the same rows), stored at local id ``j * batch_size``
    (every batch but the globally last one is full, and that one comes last).

    ``fisher`` (a ChunkedFisher) gets every committed block's rows: on a resume it first
    re-reads the blocks already committed, so its sums always match the store's blocks.

    ``factors`` ({layer: (k_in, k_out)}, see factors.factor_shapes) makes pass 1 also keep
    those layers' Kronecker factors for EK-FAC in the store, resumed like the sketches.

    ``workers``: DataLoader processes collating batches ahead (None: ``default_workers()``).
    """
    n = len(train_data)
    if blocks is None:
        blocks = range(batch_count(n, batch_size))
    start = store.committed_blocks
    if start:
        log.info("resuming: %d of %d batches already sketched", start, len(blocks))
        _check_data_unchanged(store, train_data, blocks[:start], batch_size)
        damaged = store.damaged_blocks()  # a re-run also recomputes blocks damaged on disk
        if damaged:
            log.warning("recomputing sketch blocks damaged on disk: %s", damaged[:20])
            resketch_blocks(store, sketcher, train_data, loss_fn, damaged,
                            batch_size=batch_size, collate=collate, blocks=blocks)
    if fisher is not None and start < len(blocks):  # -- Fisher in pass 1 (streaming pass 2)
        for s, rows in store.iter_blocks():
            fisher.add(s, rows)
    kfac = Pass1Factors(store, factors) if factors else None
    if kfac is not None and kfac.blocks < start:  # committed after the last checkpoint
        _recapture_factors(kfac, sketcher, train_data, loss_fn, blocks, kfac.blocks, start,
                           batch_size=batch_size, collate=collate)
    progress("sketch", start, len(blocks))
    slices = layer_slices(sketcher.layout)
    reached = dict.fromkeys(slices, False)  # layers with a nonzero sketch so far
    for j, lo, hi, digest, batch in block_batches(train_data, blocks, batch_size, collate,
                                                  start, workers):
        if digest is None:
            raise batch
        b = blocks[j]
        if kfac is not None:
            rows = kfac.capture(sketcher, lambda: _sketch_batch(sketcher, batch, loss_fn, lo,
                                                                hi, b)).numpy()
        else:
            rows = _sketch_batch(sketcher, batch, loss_fn, lo, hi, b).numpy()
        store.put_block(j, j * batch_size, rows, digest=digest)
        for name, sl in slices.items():
            reached[name] = reached[name] or bool(rows[:, sl].any())
        if kfac is not None:
            kfac.committed(last=j == len(blocks) - 1)
        if fisher is not None:
            fisher.add(j * batch_size, rows)
        progress("sketch", j + 1, len(blocks))
    report_zero_layers(store, sketcher, reached, resumed=start > 0,
                       whose="" if len(blocks) == batch_count(n, batch_size)
                       else " of this worker's batches")


def _exclude(globs: list[str]) -> str:
    """The ``layers`` option that leaves out ``globs``, as the caller writes it."""
    cli = " ".join(option("layers", g) for g in globs)
    return spelled(cli, option("layers", globs[0]) if len(globs) == 1 else f"layers={globs!r}")


def report_zero_layers(store, sketcher, reached: dict, *, resumed: bool, whose: str = ""):
    """End of pass 1: one line naming the selected layers whose gradient was zero for every
    example (a resumed build also reads the blocks an earlier run committed). Pass 2 drops
    them from the preconditioner and config.json records them (``capture.zero_gradient``)."""
    slices = layer_slices(sketcher.layout)
    if resumed and not all(reached.values()):
        for _, rows in store.iter_blocks():
            for name, sl in slices.items():
                reached[name] = reached[name] or bool(rows[:, sl].any())
            if all(reached.values()):
                break
    zero = [name for name, r in reached.items() if not r]
    if zero and len(zero) < len(reached):  # all of them: pass 2 refuses the index instead
        log.warning("pass 1: %d selected layer(s) had a zero gradient for every training "
                    "example%s: %s; they are dropped from the preconditioner and add nothing "
                    "to any score (exclude them with %s)", len(zero), whose, ", ".join(zero),
                    _exclude(sorted({sketcher.exclude_glob(z) for z in zero})))
    return zero


def _recapture_factors(kfac, sketcher, train_data, loss_fn, blocks, first: int, end: int, *,
                       batch_size: int, collate) -> None:
    """Factors of committed blocks first..end-1 (an interrupted pass 1 committed them after
    its last factor checkpoint): the same batches captured again, their rows discarded."""
    n = len(train_data)
    for j in range(first, end):
        b = blocks[j]
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        batch = collate_items(collate, [train_data[i] for i in range(lo, hi)],
                              f"training examples {lo}..{hi - 1}")
        kfac.capture(sketcher, lambda: _sketch_batch(sketcher, batch, loss_fn, lo, hi, b))
    kfac.committed(last=True)


def _sketch_batch(sketcher, batch, loss_fn, lo: int, hi: int, b: int):
    """One batch's sketches; a failure names the training ids and whose code failed."""
    try:
        return sketcher.sketch(batch, loss_fn)
    except CaptureError as e:
        if e.example is not None:
            raise AttributionError(
                f"training example {lo + e.example} (train id; batch {b}): {e}") from e
        raise
    except (StoreError, AttributionError, TaskError):
        raise
    except Exception as e:  # the user's loss (or model) raised on these examples
        raise TaskError(f"the loss raised {type(e).__name__} on training examples {lo}..{hi - 1} "
                        f"(batch {b}): {e}; fix the loss or the data (every batch before this "
                        "one is saved: re-running the build resumes here)") from e


def _check_data_unchanged(store, train_data: Sequence, blocks: Sequence[int],
                          batch_size: int) -> None:
    """Refuse to reuse sketches of examples that changed: every committed block's stored data
    fingerprint must equal the examples' fingerprint now (blocks without one are skipped)."""
    n = len(train_data)
    for j, b in enumerate(blocks):
        stored = store.block_digest(j)
        if stored is None:
            continue
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        now = block_digest(train_data[i] for i in range(lo, hi))
        k = first_difference(stored, now)
        if k is not None:
            raise AttributionError(
                f"training example {lo + k} differs from the one already sketched into "
                f"{store.path} (the first that differs: the training data changed since this "
                "build started, and its stored sketches would be stale); build into a new "
                f"{option('out')}, or delete the old directory to rebuild over the new data")


def resketch_blocks(store, sketcher, train_data: Sequence, loss_fn, damaged: Sequence[int], *,
                    batch_size: int, collate, blocks: Sequence[int] | None = None) -> None:
    """Sketch the given committed blocks again (blocks damaged on disk): each block's
    examples must still match the data fingerprint stored with it. ``blocks`` maps a store's
    block number to its global batch number (a worker's shard; default: the same)."""
    n = len(train_data)
    for j in damaged:
        b = j if blocks is None else blocks[j]
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        items = [train_data[i] for i in range(lo, hi)]
        stored = store.block_digest(j)
        k = None if stored is None else first_difference(stored, block_digest(items))
        if k is not None:
            raise AttributionError(f"training example {lo + k} differs from the one the index "
                                   "was built over; pass the task and data it was built from")
        batch = collate_items(collate, items, f"training examples {lo}..{hi - 1}")
        rows = _sketch_batch(sketcher, batch, loss_fn, lo, hi, b)
        store.replace_block(j, j * batch_size, rows.numpy())
