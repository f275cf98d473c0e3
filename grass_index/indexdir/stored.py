"""Reading back what an index directory holds: the store's raw rows in id-ordered chunks, the
preconditioned vectors, exact re-scoring from the stored rows, the FAISS file(s) checked
against the record; the preconditioner-state codec lives in precondition/state.py
(re-exported here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..index import ShardedIndex, SketchedIndex, VectorIndex, check_serves
from ..precondition import DampingError, guard_precision
from ..precondition.preconditioner import FLOAT32_TINY
from ..precondition.fisher import layer_slices
from ..precondition.persist import state_from_array, state_to_array  # noqa: F401  (re-exported)
from ..index.store_scan import raw_rerank
from ..untrusted import plain_file_name
from .errors import AttributionError
from .records import IndexRecord


CHUNK_BYTES = 256 << 20  # a chunk of a 196,608-wide LM store is ~340 rows, not 2048 (1.6 GB)


def chunks(store, rows_per_chunk: int = 2048, limit: int | None = None):
    """Stored blocks regrouped into ~2k-row chunks (id order): big matmuls instead of many small;
    at most ``CHUNK_BYTES`` of rows (wide sketches get fewer rows per chunk). ``limit``: ids
    below it only (a generation's rows; an add still running may have stored more)."""
    rows_per_chunk = max(1, min(rows_per_chunk, CHUNK_BYTES // (4 * store.dim)))
    buf, start, n = [], 0, 0
    for s, rows in store.iter_blocks():
        if limit is not None:
            if s >= limit:
                break
            rows = rows[:limit - s]
        if not buf:
            start = s
        buf.append(rows)
        n += len(rows)
        if n >= rows_per_chunk:
            yield start, np.concatenate(buf)
            buf, n = [], 0
    if buf:
        yield start, np.concatenate(buf)


def preconditioned_blocks(store, pre, limit: int | None = None):
    """(start id, preconditioned rows). A layer block whose sketch is below 1e-30 (a saturated
    example: loss 0, gradient ~1e-38) is stored as 0; a signal float32 held that
    the damping destroyed (underflow, judged per layer against the row's own sketch, or
    overflow) is refused: the scores would be 0.0 or inf and the ranking arbitrary."""
    slices = layer_slices(pre.layout)
    for start, rows in chunks(store, limit=limit):
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
    needs = "smaller" if way == "under" else "larger"
    tiny = [name for name, lam in pre.damping_used.items() if 0 < lam < FLOAT32_TINY]
    if way == "over" and tiny:  # 1/λ itself is beyond float32: the Fisher is, not the damping
        needs = "identity"
        what += (f"; layer(s) {', '.join(tiny[:4])} have a Fisher below float32's range (λ = "
                 "factor × mean eigenvalue < 1.2e-38: nearly every example is saturated, its "
                 "gradient ~0), so no relative damping fits them")
    return DampingError(f"the preconditioned vectors of training examples {ids} {what} (λ used "
                        f"per layer: {pre.damping_used})", needs=needs)


def store_rerank(store, pre):
    """Exact scores of candidate ids: ⟨(F+λI)^{-1} q, ĝ_i⟩ from the stored raw rows (the
    inverse is symmetric, so preconditioning the query once equals preconditioning each row).
    Candidate rows are read without re-checking their block checksums (a query reads R·k rows,
    each from a block of batch_size rows); `grass-index verify` checks every block."""
    raw = raw_rerank(store, pre.layout, np.zeros((0, 2), np.int64))
    return lambda queries, ids: raw(pre.apply(queries), ids)


def load_faiss(path: Path, record: IndexRecord, *, mmap: bool = False, verify: bool = True,
               check: bool = True):
    """The finished index's FAISS index: its one file, or its parts searched as one —
    checked (``check``) to belong to this build (key, count, id range) before it serves."""
    names = [plain_file_name(n, f"{path}: index file") for n in record.index_files]
    parts = [VectorIndex.load(path / name, mmap=mmap, verify=verify) for name in names]
    vindex = parts[0] if len(parts) == 1 else ShardedIndex(parts)
    if check:
        check_serves(vindex, record.preconditioner_key, record.n_live,
                     ", ".join(str(path / name) for name in names), ids_below=record.n_train)
    return SketchedIndex.wrap(vindex, dict(record.index))
