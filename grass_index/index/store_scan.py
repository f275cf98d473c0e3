"""Exact search served from the sketch store itself: no second copy of the vectors.

An exact FAISS index held (F + λI)⁻¹ĝ_i for every training example: a preconditioned copy as
large as the store (GPT-2 small at n = 64: 2.04× the sketches on disk; at n = 4,096 3.2 GB of
16 GB). The inverse is symmetric, so ⟨q, (F + λI)⁻¹ĝ_i⟩ = ⟨(F + λI)⁻¹q, ĝ_i⟩: precondition the
query once and scan the raw rows the store already holds. A flat FAISS search is the same
scan (a GEMM over every vector); the query also reads the preconditioner, which is why
index/choice.py ``scans_store`` picks the scan only where that is small beside the rows.
Pass 2 skips preconditioning every row (one apply of each layer's inverse per recall query
instead), and a living index's new generation re-writes no vectors: its refit is the
preconditioner's alone.

What the FAISS rows encoded is kept: a layer block whose sketch is below 1e-30 (a saturated
example, loss 0) scores exactly 0 (``saturated_blocks``, found once by pass 2 and stored
beside the preconditioner), removed examples are never returned, and a query whose
preconditioned sketch left float32 is refused instead of answered with 0.0 or inf.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

from ..precondition import DampingError, guard_precision
from ..precondition.fisher import layer_slices
from ..precondition.forms import LowRank
from ..precondition.preconditioner import REPRESENTABLE
from ._file import FaissIndexError

HELD = "store"  # config.json's index.held: the exact vectors are the store's rows
SCORES_BYTES = 256 << 20  # a query group's [B, n] scores at most (then the next group scans)
GATHER_BYTES = 8 << 20  # small blocks are scored together in chunks of this size


def saturated_blocks(rows: np.ndarray, starts: np.ndarray, empty_too: bool = False
                     ) -> np.ndarray:
    """[m, 2] (row within ``rows``, layer index) of the layer blocks below REPRESENTABLE that
    hold anything at all (an all-zero block scores 0 already; ``empty_too``: those as well)."""
    if not len(rows):
        return np.zeros((0, 2), np.int64)
    top = np.maximum.reduceat(np.abs(rows), starts, axis=1)
    tiny = top < REPRESENTABLE if empty_too else (top < REPRESENTABLE) & (top > 0)
    return np.argwhere(tiny).astype(np.int64)


def zero_blocks(rows: np.ndarray, pairs: np.ndarray, slices: list[slice]) -> np.ndarray:
    """``rows`` with the blocks ``pairs`` names ([m, 2]: row, layer index) set to 0, in place."""
    for r, layer in pairs:
        rows[r, slices[layer]] = 0
    return rows


def precondition_queries(pre, queries, dim: int, only: list[str] | None = None):
    """(P q float32 [B, K], rows that underflowed, rows that overflowed). A query block below
    1e-30 is set to 0 first (it scores 0, like a saturated training block, with flush-to-zero
    on or off); ``only``: the layers to precondition (the others' columns stay the raw,
    cleaned q); ``precondition.guard_precision`` judges those against the query's sketch."""
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim or q.dtype.kind != "f":
        raise FaissIndexError(f"queries must be floating point of shape (n, {dim}), got "
                              f"{q.shape} {q.dtype}")
    q = np.array(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise FaissIndexError("queries contain NaN or inf (rows "
                              f"{np.flatnonzero(~np.isfinite(q).all(1))[:10].tolist()})")
    slices = layer_slices(pre.layout)
    zero_blocks(q, saturated_blocks(q, starts_of(pre.layout), empty_too=True),
                list(slices.values()))
    names = list(slices) if only is None else list(only)
    sub = {name: pre.layout[name] for name in names}
    cols = np.concatenate([np.arange(slices[name].start, slices[name].stop) for name in names]
                          ) if names else np.zeros(0, np.intp)
    pq = q.copy()
    if not len(cols):
        return pq, np.zeros(0, np.intp), np.zeros(0, np.intp)
    with np.errstate(over="ignore"):  # an overflow is found and named just below
        part = np.concatenate([np.asarray(pre.apply_layer(name, q[:, slices[name]]),
                                          np.float32) for name in names], axis=1)
    part, under, over = guard_precision(q[:, cols], part, layer_slices(sub))
    pq[:, cols] = part
    return pq, under, over


def checked_queries(pre, queries, dim: int, only: list[str] | None = None) -> np.ndarray:
    """``precondition_queries``'s P q, or a DampingError when the damping took a query out of
    float32 (its scores would be 0.0 or inf)."""
    pq, under, over = precondition_queries(pre, queries, dim, only=only)
    if len(under) or len(over):
        bad = (under if len(under) else over)[:5].tolist()
        way = "underflowed" if len(under) else "overflowed"
        raise DampingError(
            f"query sketch(es) {bad} {way} float32 when preconditioned (λ per layer: "
            f"{pre.damping_used}): their scores would be {'0.0' if len(under) else 'inf'}; "
            f"re-precondition the index with a {'smaller' if len(under) else 'larger'} "
            "damping or hessian identity", needs="smaller" if len(under) else "larger")
    return pq


def raw_rerank(store, layout: dict, saturated: np.ndarray):
    """Exact scores ⟨P q, ĝ_i⟩ of candidate ids from the stored raw rows, for queries already
    preconditioned (a search sketch over raw rows: search_sketch.SketchedIndex with a
    ``precondition``); a row's saturated blocks (``saturated``: id, layer) score 0. The
    rows' block checksums are verify's."""
    slices = list(layer_slices(layout).values())
    sat = np.asarray(saturated, np.int64).reshape(-1, 2)

    def rerank(pq, ids):
        out = np.empty(ids.shape, np.float32)
        for r in range(len(ids)):
            rows = np.asarray(store.get_rows(ids[r], verify=False), np.float32)
            for i, layer in sat[np.isin(sat[:, 0], ids[r])]:
                rows[ids[r] == i, slices[layer]] = 0
            out[r] = rows @ pq[r]
        return out
    return rerank


def low_rank(pre) -> set:
    """The layers of ``pre`` kept in the low-rank form (their scores come from the core)."""
    return {name for name, f in (pre.forms or {}).items() if isinstance(f, LowRank)}


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
    def preconditioned(self, queries, pre, low: set) -> np.ndarray:
        """[B, K]: P q on every layer but the low-rank ones ``low``, whose columns keep the
        raw q (``checked_queries``)."""
        return checked_queries(pre, queries, self.dim,
                               only=[name for name in pre.layout if name not in low])

    # -- search --------------------------------------------------------------------------
    def search(self, queries, k: int, *, opponents: bool = False, nprobe: int | None = None):
        """Top-k by ⟨(F + λI)⁻¹q, ĝ_i⟩ over the live rows: (scores float32 [B, k'], ids int64
        [B, k']), k' = min(k, ntotal), as VectorIndex.search (opponents: most negative first,
        true signed scores). ``nprobe`` has no meaning for an exact scan."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise FaissIndexError(f"k must be a positive integer, got {k!r}")
        pre = self._pre()
        low = low_rank(pre)
        pq = self.preconditioned(queries, pre, low)
        kk = min(int(k), self.ntotal)
        B, n = len(pq), len(self.live)
        scores = np.empty((B, kk), np.float32)
        ids = np.empty((B, kk), np.int64)
        if kk == 0:
            return scores, ids
        group = max(1, SCORES_BYTES // (8 * max(n, 1) * (1 + len(low))))
        for lo in range(0, B, group):
            ranked = self.scores(pq[lo:lo + group], pre)
            if opponents:
                np.negative(ranked, out=ranked)
            ranked[:, ~self.live] = -np.inf  # removed examples are never returned
            s, i = _top(ranked, kk)
            scores[lo:lo + len(s)] = -s if opponents else s
            ids[lo:lo + len(s)] = i
        return scores, ids

    def scores(self, pq: np.ndarray, pre) -> np.ndarray:
        """[B, n_train] scores from one scan of the store (removed ids' columns meaningless).

        A low-rank layer (n < k, forms.LowRank: P = (I − GᵀCG)/λ with C = (GGᵀ + nλI)⁻¹ over
        its n live rows G) needs no P q: G P q = (Gq − GGᵀC Gq)/λ = n·C·(Gq), since
        GGᵀC = I − nλC. The scan gathers u = Gq (the raw q's inner products, a batched
        product per run of equal-width layers) and one n×n product per layer finishes them:
        one pass over the rows, as an exact FAISS search."""
        names, n = list(pre.layout), len(self.live)
        slices = list(layer_slices(pre.layout).values())
        low = low_rank(pre)
        runs = _runs(slices, [j for j, name in enumerate(names) if name in low])
        direct = pq.copy()
        for cols, layers, _ in runs:
            direct[:, cols] = 0
        any_direct = bool(direct.any())
        out = np.zeros((len(pq), n), np.float32)
        u = {j: np.zeros((len(pq), n), np.float32) for _, layers, _ in runs for j in layers}
        sat_ids, held = np.unique(self.saturated[:, 0]), {}
        q_runs = [pq[:, cols].reshape(len(pq), len(layers), k).transpose(1, 2, 0)
                  for cols, layers, k in runs]  # [L, k, B] per run

        def block(start, rows):
            hi = start + len(rows)
            if any_direct:
                out[:, start:hi] = (rows @ direct.T).T
            for (cols, layers, k), qr in zip(runs, q_runs):
                got = np.matmul(rows[:, cols].reshape(len(rows), len(layers), k)
                                .transpose(1, 0, 2), qr)  # [L, b, B]
                for t, j in enumerate(layers):
                    u[j][:, start:hi] = got[t].T
            for i in sat_ids[(sat_ids >= start) & (sat_ids < hi)]:
                held[int(i)] = np.array(rows[i - start])
        with self._open() as store:
            gather = _Gathered(block, self.dim)
            store.scan_blocks(gather, limit=n, verify=False)  # the checksums are verify's
            gather.flush()
        live, n_live = self.live, int(self.live.sum())
        per_low = {}
        for j in u:  # n·C·u over the live rows, in float64
            per_low[j] = n_live * (u[j][:, live].astype(np.float64) @ pre.forms[names[j]].core)
            out[:, live] += per_low[j].astype(np.float32)
        if held:
            self._rescore_saturated(out, held, pq, slices, per_low)
        return out

    def _rescore_saturated(self, out, held: dict, pq, slices, per_low: dict) -> None:
        """Rows with saturated blocks: their score is the sum over their other layers only."""
        position = np.cumsum(self.live) - 1  # a live id's column among the live rows
        for i, row in held.items():
            gone = set(self.saturated[self.saturated[:, 0] == i, 1].tolist())
            total = np.zeros(len(pq))
            for j, sl in enumerate(slices):
                if j in gone:
                    continue
                total += per_low[j][:, position[i]] if j in per_low else \
                    np.asarray(row[sl], np.float64) @ np.asarray(pq[:, sl], np.float64).T
            out[:, i] = total

    def reconstruct(self, ids) -> np.ndarray:
        """(F + λI)⁻¹ĝ_i of ``ids`` as an exact FAISS index would hold them."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        held = _in(ids, self.live)
        if not held.all():
            raise KeyError(f"id {int(ids[~held][0])} is not in the index")
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


class _Gathered:
    """Small consecutive blocks (an MLP's batch of 32 narrow rows) copied into one chunk of up
    to GATHER_BYTES before ``fn`` sees them: a few large products instead of many tiny ones;
    a block as large as a chunk (a language model's) goes to ``fn`` as the map's view."""

    def __init__(self, fn, dim: int):
        self.fn, self.cap = fn, max(1, GATHER_BYTES // (4 * max(dim, 1)))
        self.buf = np.empty((self.cap, dim), np.float32)
        self.start, self.fill = 0, 0

    def __call__(self, start: int, rows: np.ndarray) -> None:
        if len(rows) >= self.cap:
            self.flush()
            self.fn(start, rows)
            return
        if self.fill + len(rows) > self.cap or (self.fill and start != self.start + self.fill):
            self.flush()
        if not self.fill:
            self.start = start
        self.buf[self.fill:self.fill + len(rows)] = rows
        self.fill += len(rows)

    def flush(self) -> None:
        if self.fill:
            self.fn(self.start, self.buf[:self.fill])
            self.fill = 0


def _runs(slices: list[slice], layers: list[int]) -> list[tuple[slice, list[int], int]]:
    """``layers`` grouped into runs of adjacent layers of equal width: (their columns, the
    layer indices, k), so a block's inner products with each are one batched product."""
    runs: list[tuple[slice, list[int], int]] = []
    for j in layers:
        k = slices[j].stop - slices[j].start
        if runs and runs[-1][1][-1] == j - 1 and runs[-1][2] == k:
            cols, members, _ = runs[-1]
            runs[-1] = (slice(cols.start, slices[j].stop), members + [j], k)
        else:
            runs.append((slices[j], [j], k))
    return runs


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
