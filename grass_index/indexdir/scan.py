"""Exact search served from the sketch store itself: no second copy of the vectors.

An exact FAISS index held (F + λI)⁻¹ĝ_i for every training example: a preconditioned copy as
large as the store (GPT-2 small at n = 64: 2.04× the sketches on disk; at n = 4,096 3.2 GB of
16 GB). The inverse is symmetric, so ⟨q, (F + λI)⁻¹ĝ_i⟩ = ⟨(F + λI)⁻¹q, ĝ_i⟩: precondition the
query once and scan the raw rows the store already holds. A flat FAISS search is the same
scan (a GEMM over every vector), so a query costs the same; pass 2 skips preconditioning
every row (one apply of each layer's inverse per recall query instead), and a living index's
new generation re-writes no vectors: its refit is the preconditioner's alone.

What the FAISS rows encoded is kept: a layer block whose sketch is below 1e-30 (a saturated
example, loss 0) scores exactly 0 (``saturated_blocks``, found once by pass 2 and stored
beside the preconditioner), removed examples are never returned, and a query whose
preconditioned sketch left float32 is refused instead of answered with 0.0 or inf.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

from ..index import FaissIndexError
from ..precondition import guard_precision
from ..precondition.fisher import layer_slices
from ..precondition.preconditioner import REPRESENTABLE
from .errors import AttributionError

HELD = "store"  # config.json's index.held: the exact vectors are the store's rows
SCORES_BYTES = 256 << 20  # a query group's [B, n] scores at most (then the next group scans)


def saturated_name(key: str) -> str:
    """The store array of variant ``key``'s saturated (row, layer) pairs (beside its
    preconditioner's, so it is cleaned up with them)."""
    return f"precond/{key}/saturated"


def saturated_blocks(rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """[m, 2] (row within ``rows``, layer index) of the layer blocks below REPRESENTABLE that
    hold anything at all (an all-zero block scores 0 already)."""
    if not len(rows):
        return np.zeros((0, 2), np.int64)
    top = np.maximum.reduceat(np.abs(rows), starts, axis=1)
    return np.argwhere((top < REPRESENTABLE) & (top > 0)).astype(np.int64)


def zero_blocks(rows: np.ndarray, pairs: np.ndarray, slices: list[slice]) -> np.ndarray:
    """``rows`` with the blocks ``pairs`` names ([m, 2]: row, layer index) set to 0, in place."""
    for r, layer in pairs:
        rows[r, slices[layer]] = 0
    return rows


def precondition_queries(pre, queries, dim: int):
    """(P q float32 [B, K], rows that underflowed, rows that overflowed): a query block below
    1e-30 is set to 0 (it scores 0, like a saturated training block, with flush-to-zero on or
    off); ``precondition.guard_precision`` judges the rest against the query's own sketch."""
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim or q.dtype.kind != "f":
        raise FaissIndexError(f"queries must be floating point of shape (n, {dim}), got "
                              f"{q.shape} {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise FaissIndexError("queries contain NaN or inf (rows "
                              f"{np.flatnonzero(~np.isfinite(q).all(1))[:10].tolist()})")
    with np.errstate(over="ignore"):  # an overflow is found and named just below
        pq = np.array(pre.apply(q), dtype=np.float32)
    return guard_precision(q, pq, layer_slices(pre.layout))


def starts_of(layout: dict) -> np.ndarray:
    return np.array([sl.start for sl in layer_slices(layout).values()], dtype=np.intp)


class StoreScan:
    """The exact index of a build whose vectors are its stored rows: ``search`` preconditions
    the queries and scans the rows (the interface of index.VectorIndex that readers use:
    search, ntotal, ids, reconstruct, describe).

    ``open_store()``: a context manager giving the open store (a query opens it per search);
    ``preconditioner()``: the index's; ``live``: bool [n_train], the ids that count;
    ``saturated``: [m, 2] (training id, layer index) of the blocks that score 0."""

    kind, dtype, metric, nlist, nprobe, held = "flat", "float32", "ip", None, None, HELD

    def __init__(self, open_store: Callable, preconditioner: Callable, *, dim: int,
                 live: np.ndarray, saturated: np.ndarray, build_key: str,
                 recall: dict | None = None):
        self._open, self._pre = open_store, preconditioner
        self.dim, self.live = int(dim), np.asarray(live, bool)
        self.saturated = np.asarray(saturated, np.int64).reshape(-1, 2)
        self.build_key, self.recall = build_key, recall

    @property
    def ntotal(self) -> int:
        return int(self.live.sum())

    def ids(self) -> np.ndarray:
        return np.flatnonzero(self.live).astype(np.int64)

    def describe(self) -> dict:
        return {"kind": "flat", "dim": self.dim, "metric": "ip", "ntotal": self.ntotal,
                "nlist": None, "nprobe": None, "trained": True, "dtype": "float32",
                "recall": self.recall, "exponents": None, "build_key": self.build_key,
                "held": HELD}

    def __repr__(self) -> str:
        return f"StoreScan(dim={self.dim}, ntotal={self.ntotal})"

    # -- the queries' side ---------------------------------------------------------------
    def preconditioned(self, queries) -> tuple[np.ndarray, list[slice]]:
        """(P q float32 [B, K], layer slices) by ``precondition_queries``; a query the damping
        took out of float32 is refused (its scores would be 0.0 or inf)."""
        pre = self._pre()
        pq, under, over = precondition_queries(pre, queries, self.dim)
        if len(under) or len(over):
            bad = (under if len(under) else over)[:5].tolist()
            way = "underflowed" if len(under) else "overflowed"
            raise AttributionError(
                f"query sketch(es) {bad} {way} float32 when preconditioned (λ per layer: "
                f"{pre.damping_used}): their scores would be {'0.0' if len(under) else 'inf'}; "
                f"re-precondition the index with a {'smaller' if len(under) else 'larger'} "
                "damping or hessian identity")
        return pq, list(layer_slices(pre.layout).values())

    # -- search --------------------------------------------------------------------------
    def search(self, queries, k: int, *, opponents: bool = False, nprobe: int | None = None):
        """Top-k by ⟨(F + λI)⁻¹q, ĝ_i⟩ over the live rows: (scores float32 [B, k'], ids int64
        [B, k']), k' = min(k, ntotal), as VectorIndex.search (opponents: most negative first,
        true signed scores). ``nprobe`` has no meaning for an exact scan."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise FaissIndexError(f"k must be a positive integer, got {k!r}")
        pq, slices = self.preconditioned(queries)
        kk = min(int(k), self.ntotal)
        B, n = len(pq), len(self.live)
        scores = np.empty((B, kk), np.float32)
        ids = np.empty((B, kk), np.int64)
        if kk == 0:
            return scores, ids
        group = max(1, SCORES_BYTES // (4 * max(n, 1)))
        for lo in range(0, B, group):
            ranked = self.scores(pq[lo:lo + group], slices)
            if opponents:
                np.negative(ranked, out=ranked)
            ranked[:, ~self.live] = -np.inf  # removed examples are never returned
            s, i = _top(ranked, kk)
            scores[lo:lo + len(s)] = -s if opponents else s
            ids[lo:lo + len(s)] = i
        return scores, ids

    def scores(self, pq: np.ndarray, slices: list[slice]) -> np.ndarray:
        """[B, n_train] ⟨pq, ĝ_i⟩ from one scan of the store (removed ids included)."""
        n = len(self.live)
        out = np.zeros((len(pq), n), np.float32)
        sat_rows = self.saturated[:, 0]
        with self._open() as store:
            for start, rows in _blocks(store, n):
                hi = start + len(rows)
                out[:, start:hi] = (rows @ pq.T).T
                mine = (sat_rows >= start) & (sat_rows < hi)
                if mine.any():  # recompute those rows with their saturated blocks at 0
                    pairs = self.saturated[mine] - np.array([start, 0])
                    rs = np.unique(pairs[:, 0])
                    fixed = zero_blocks(rows[rs].copy(), _renumber(pairs, rs), slices)
                    out[:, start + rs] = (fixed @ pq.T).T
        return out

    def reconstruct(self, ids) -> np.ndarray:
        """(F + λI)⁻¹ĝ_i of ``ids`` as an exact FAISS index would hold them."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.live)
                         or not self.live[ids].all()):
            raise KeyError(f"id {int(ids[~_in(ids, self.live)][0])} is not in the index")
        with self._open() as store:
            rows = np.asarray(store.get_rows(ids, verify=False), np.float32)
        pre = self._pre()
        slices = list(layer_slices(pre.layout).values())
        sat = self.saturated
        pairs = [(j, layer) for j, i in enumerate(ids) for layer in sat[sat[:, 0] == i, 1]]
        zero_blocks(rows, np.array(pairs, np.int64).reshape(-1, 2), slices)
        return np.asarray(pre.apply(rows), np.float32)


def _in(ids: np.ndarray, live: np.ndarray) -> np.ndarray:
    ok = (ids >= 0) & (ids < len(live))
    ok[ok] = live[ids[ok]]
    return ok


def _renumber(pairs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``pairs`` with their row numbers replaced by positions in the sorted ``rows``."""
    return np.column_stack([np.searchsorted(rows, pairs[:, 0]), pairs[:, 1]])


def _blocks(store, limit: int):
    """(start id, rows) of the ids below ``limit``, without re-checking block checksums (a
    query reads every row; `grass-index verify` checks them)."""
    for start, rows in store.iter_blocks(verify=False):
        if start >= limit:
            break
        yield start, rows[:limit - start]


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest scores and their column ids, best first (ties by id)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    got = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -got), axis=1)
    ids = np.take_along_axis(part, order, 1).astype(np.int64)
    return np.take_along_axis(got, order, 1), ids


def held_open(store) -> Callable:
    """``StoreScan``'s ``open_store`` over a store already open (pass 2 holds it throughout)."""
    return lambda: contextlib.nullcontext(store)
