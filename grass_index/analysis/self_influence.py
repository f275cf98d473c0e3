"""Self-influence g_iᵀ (F + λI)⁻¹ g_i of every training example, from the stored sketches.

An example with a large self-influence is one the model can only fit by moving far in a
direction few other examples share: mislabelled items and outliers rank high, which is why
it is the usual first screen when cleaning a dataset. The stored raw sketch ĝ_i and its
preconditioned row (F + λI)⁻¹ĝ_i are both available per block, so the score is one
row-wise dot product per example (no gradient recomputed, no query needed).

The score uses the index's preconditioner whatever score mode queries use: under cosine
normalisation every self-score would be 1, which ranks nothing.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import repair_command
from ..indexdir.errors import AttributionError


def self_influence(idx) -> torch.Tensor:
    """float64 [n_train]: ĝ_iᵀ (F + λI)⁻¹ ĝ_i for every training example, in train-id order.

    Summed over layers (the preconditioner is block-diagonal, so this is the per-layer
    quadratic forms added up). With ``hessian="identity"`` it is the squared sketch norm. For
    a checkpoint ensemble it is the mean over checkpoints, like its query scores. A removed
    example (a living index's) gets NaN: it is no longer a training example, and
    ``rank_self_influence`` never ranks it.
    """
    pre = idx.preconditioner
    out = np.empty(idx.n_train, dtype=np.float64)
    seen = 0
    for start, raw in idx.raw_sketches():
        raw = np.asarray(raw, dtype=np.float32)
        vec = np.asarray(pre.apply(raw), dtype=np.float64)
        out[start:start + len(raw)] = np.einsum("ij,ij->i", raw.astype(np.float64), vec)
        seen += len(raw)
    C = idx.record.checkpoints
    if C > 1:  # an ensemble: the mean over checkpoints of each one's g_iᵀ(F_c + λ_c I)⁻¹g_i
        out /= C
    out[list(idx.record.removed)] = np.nan
    if seen != idx.n_train:
        raise AttributionError(f"the sketch store of {idx.path} holds {seen} rows, the index "
                               f"{idx.n_train}; run {repair_command(idx.path)}")
    return torch.from_numpy(out)


def rank_self_influence(scores, top_k: int | None = None) -> list[tuple[int, float]]:
    """(train_id, score) pairs, highest self-influence first (ties: lower id first); NaN (a
    removed example) is left out."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))  # stable, id breaks ties
    order = order[~np.isnan(s[order])]
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise AttributionError(f"top_k must be a positive integer, got {top_k!r}")
        order = order[:top_k]
    return [(int(i), float(s[i])) for i in order]
