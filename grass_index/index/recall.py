"""Recall of an approximate top-k against the exact one (the quality number reported for IVF)."""
from __future__ import annotations

import numpy as np


def recall_at_k(approx_ids, exact_ids, k: int) -> float:
    """Mean over queries of |approx[:k] ∩ exact[:k]| / k; padding ids (-1) never count."""
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(f"approx_ids and exact_ids must be (m, >=k) arrays with the same m, "
                         f"got {a.shape} and {e.shape}")
    if k <= 0 or k > e.shape[1]:
        raise ValueError(f"k must be in 1..{e.shape[1]} (columns of exact_ids), got {k}")
    if a.shape[0] == 0:
        return 1.0
    hits = 0
    for row_a, row_e in zip(a[:, :k], e[:, :k]):
        hits += len(np.intersect1d(row_a[row_a >= 0], row_e[row_e >= 0]))
    return hits / (a.shape[0] * k)
