"""Recall of an approximate top-k against the exact one (the quality number an index records)."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("grass_index")
RECALL_QUERIES, RECALL_K = 100, 10  # a build's recall check: training sketches as queries


def recall_at_k(approx_ids, exact_ids, k: int, *, exclude=None) -> float:
    """Mean over queries of |approx[:k] ∩ exact[:k]| / k; padding ids (-1) never count.

    ``exclude`` (one id per query) drops that id from both lists first — a training example used
    as a query finds itself, which would make any index look better than it is. Both lists then
    need k + 1 columns.
    """
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(f"approx_ids and exact_ids must be (m, >=k) arrays with the same m, "
                         f"got {a.shape} and {e.shape}")
    need = k + (exclude is not None)
    if k <= 0 or need > e.shape[1]:
        raise ValueError(f"k must be in 1..{e.shape[1] - (exclude is not None)} (columns of "
                         f"exact_ids{', less the excluded id' if exclude is not None else ''}), "
                         f"got {k}")
    if a.shape[0] == 0:
        return 1.0
    skip = np.full(a.shape[0], -1) if exclude is None else np.asarray(exclude).reshape(-1)
    hits = 0
    for row_a, row_e, s in zip(a, e, skip):
        row_a = row_a[(row_a >= 0) & (row_a != s)][:k]
        row_e = row_e[(row_e >= 0) & (row_e != s)][:k]
        hits += len(np.intersect1d(row_a, row_e))
    return hits / (a.shape[0] * k)


class ExactTopK:
    """Exact top-k inner products of fixed queries over vectors streamed in chunks: the ground
    truth for :func:`recall_at_k` without holding all vectors (or all scores) at once."""

    def __init__(self, queries, k: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = int(k)
        m = len(self.queries)
        self.scores = np.full((m, 0), -np.inf, np.float32)
        self.ids = np.full((m, 0), -1, np.int64)

    def add(self, vectors, ids) -> None:
        scores = self.queries @ np.asarray(vectors, np.float32).T
        self.merge(scores, np.broadcast_to(np.asarray(ids, np.int64), scores.shape))

    def merge(self, scores, ids) -> None:
        """Fold in candidate (scores, ids) per query, e.g. another process's top lists."""
        s = np.concatenate([self.scores, np.asarray(scores, np.float32)], 1)
        i = np.concatenate([self.ids, np.asarray(ids, np.int64)], 1)
        if s.shape[1] > self.k:
            top = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
            s, i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        self.scores, self.ids = s, i

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return np.take_along_axis(self.scores, order, 1), np.take_along_axis(self.ids, order, 1)


def recall_queries(n: int, live: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Recall ground truth uses training sketches as queries (the distribution of real queries'
    sketches), each one's own id excluded from both lists: (their ids, k). ``live``: the ids
    that count (bool [n]; a living index's removed ones are no queries)."""
    ids = np.arange(n, dtype=np.int64) if live is None else np.flatnonzero(live)
    m = len(ids)
    pick = np.linspace(0, m - 1, min(RECALL_QUERIES, m)).round().astype(np.int64)
    return np.unique(ids[pick]), min(RECALL_K, m - 1)


def measure_recall(vindex, exact: ExactTopK, qids, k: int, others=()) -> dict:
    """recall@k of ``vindex`` against the exact top lists, recorded on it (and ``others``)."""
    _, approx = vindex.search(exact.queries, k + 1)
    r = recall_at_k(approx, exact.result()[1], k, exclude=qids)
    recall = dict(k=k, recall=round(r, 4), queries=len(qids), nprobe=vindex.nprobe,
                  queries_from="training sketches, own id excluded")
    for v in (vindex, *others):
        v.recall = recall
    log.info("index: recall@%d = %.4f against exact search (%d queries)", k, r, len(qids))
    return recall
