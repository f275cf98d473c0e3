"""Reading back what an index directory holds: the store's raw rows in id-ordered chunks, the
preconditioned vectors, exact re-scoring from the stored rows, the FAISS file(s) checked
against the record; the preconditioner-state codec lives in precondition/state.py
(re-exported here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..index import ShardedIndex, SketchedIndex, VectorIndex, check_serves
from ..precondition import unrepresentable_rows
from ..precondition.persist import state_from_array, state_to_array  # noqa: F401  (re-exported)
from ..untrusted import plain_file_name
from .errors import AttributionError
from .records import IndexRecord


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


def store_rerank(store, pre):
    """Exact scores of candidate ids: ⟨(F+λI)^{-1} q, ĝ_i⟩ from the stored raw rows (the
    inverse is symmetric, so preconditioning the query once equals preconditioning each row).
    Candidate rows are read without re-checking their block checksums (a query reads R·k rows,
    each from a block of batch_size rows); `grass-index verify` checks every block."""
    def rerank(queries, ids):
        pq = pre.apply(queries)
        out = np.empty(ids.shape, np.float32)
        for r in range(len(ids)):
            out[r] = store.get_rows(ids[r], verify=False) @ pq[r]
        return out
    return rerank


def load_faiss(path: Path, record: IndexRecord, *, mmap: bool = False, verify: bool = True,
               check: bool = True):
    """The finished index's FAISS index: its one file, or its parts searched as one —
    checked (``check``) to belong to this build (key, count, id range) before it serves."""
    names = [plain_file_name(n, f"{path}: index file") for n in record.index_files]
    parts = [VectorIndex.load(path / name, mmap=mmap, verify=verify) for name in names]
    vindex = parts[0] if len(parts) == 1 else ShardedIndex(parts)
    if check:
        check_serves(vindex, record.preconditioner_key, record.n_train,
                     ", ".join(str(path / name) for name in names))
    return SketchedIndex.wrap(vindex, dict(record.index))
