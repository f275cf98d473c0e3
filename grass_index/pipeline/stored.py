"""Reading back what the sketch store holds: raw rows in id-ordered chunks, the preconditioned
vectors, and preconditioner states (stored as one .npz byte array)."""
from __future__ import annotations

import io

import numpy as np


def state_to_array(state: dict) -> np.ndarray:
    """A preconditioner state (dict of arrays, some of them strings) as one uint8 array (.npz)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def state_from_array(arr) -> dict:
    with np.load(io.BytesIO(np.asarray(arr, dtype=np.uint8).tobytes()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


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
    for start, rows in chunks(store):
        vec = np.asarray(pre.apply(np.asarray(rows, dtype=np.float32)), dtype=np.float32)
        yield start, np.ascontiguousarray(vec)
