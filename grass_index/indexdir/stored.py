"""Reading back what the sketch store holds: raw rows in id-ordered chunks, the preconditioned
vectors; the preconditioner-state codec lives in precondition/persist.py (re-exported here)."""
from __future__ import annotations

import numpy as np

from ..precondition import unrepresentable_rows
from ..precondition.persist import state_from_array, state_to_array  # noqa: F401  (re-exported)
from .errors import AttributionError


CHUNK_BYTES = 256 << 20  # a chunk of a 196,608-wide LM store is ~340 rows, not 2048 (1.6 GB)


def chunks(store, rows_per_chunk: int = 2048):
    """Stored blocks regrouped into ~2k-row chunks (id order): big matmuls instead of many small;
    at most ``CHUNK_BYTES`` of rows (wide sketches get fewer rows per chunk)."""
    rows_per_chunk = max(1, min(rows_per_chunk, CHUNK_BYTES // (4 * store.dim)))
    buf, start, n = [], 0, 0
    for s, rows in store.iter_blocks():
        if not buf:
            start = s
        buf.append(rows)
        n += len(rows)
        if n >= rows_per_chunk:
            yield start, np.concatenate(buf)
            buf, n = [], 0
    if buf:
        yield start, np.concatenate(buf)


def preconditioned_blocks(store, pre):
    """(start id, preconditioned rows); refuses vectors that float32 cannot represent."""
    for start, rows in chunks(store):
        vec = np.asarray(pre.apply(np.asarray(rows, dtype=np.float32)), dtype=np.float32)
        under, over = unrepresentable_rows(rows, vec)
        if len(under) or len(over):
            ids = (start + (under if len(under) else over)[:5]).tolist()
            raise AttributionError(
                f"the preconditioned vectors of training examples {ids} "
                + ("underflow float32 (every entry below 1e-30 although their sketches are "
                   "not zero): the damping is too large for these gradients"
                   if len(under) else "overflow float32: the damping is too small")
                + f" (λ used per layer: {pre.damping_used}); rebuild or reprecondition with "
                "another --damping (the default is relative: 0.3 × each layer's mean "
                "eigenvalue)")
        yield start, np.ascontiguousarray(vec)
