"""Reading back what the sketch store holds: raw rows in id-ordered chunks, the preconditioned
vectors; the preconditioner-state codec lives in precondition/persist.py (re-exported here)."""
from __future__ import annotations

import numpy as np

from ..precondition import DampingError, guard_precision
from ..precondition.fisher import layer_slices
from ..precondition.persist import state_from_array, state_to_array  # noqa: F401  (re-exported)


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
    """(start id, preconditioned rows). A layer block whose sketch is below 1e-30 (a saturated
    example: loss 0, gradient ~1e-38) is stored as 0; a signal float32 held that
    the damping destroyed (underflow, judged per layer against the row's own sketch, or
    overflow) is refused: the scores would be 0.0 or inf and the ranking arbitrary."""
    slices = layer_slices(pre.layout)
    for start, rows in chunks(store):
        vec = np.asarray(pre.apply(np.asarray(rows, dtype=np.float32)), dtype=np.float32)
        vec, under, over = guard_precision(rows, vec, slices)
        if len(under) or len(over):
            raise damping_refused(pre, (start + (under if len(under) else over)[:5]).tolist(),
                                  "under" if len(under) else "over")
        yield start, np.ascontiguousarray(vec)


def damping_refused(pre, ids: list, way: str) -> DampingError:
    """The refusal of a damping that destroyed these training examples' signals."""
    what = ("underflow float32: their sketches are well within float32's range, but "
            "preconditioning took a layer's block below it (every entry < 1.2e-38), so the "
            "damping is too large for these gradients" if way == "under" else
            "overflow float32 (inf/NaN): the damping is too small for these gradients")
    return DampingError(f"the preconditioned vectors of training examples {ids} {what} (λ used "
                        f"per layer: {pre.damping_used})",
                        needs="smaller" if way == "under" else "larger")
