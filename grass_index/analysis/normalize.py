"""Score modes: ``none`` (the influence score itself) and ``cosine`` (relative influence).

cosine(z, z_i) = ⟨ĝ(z), (F + λI)⁻¹ĝ_i⟩ / (‖ĝ(z)‖ · ‖(F + λI)⁻¹ĝ_i‖)

Unit-norm preconditioned training vectors stop a few large-gradient examples (outliers,
mislabelled items) from topping every query's list, which is what data selection wants.
The norm is over the whole concatenated vector (all layers), on the query side of the raw
sketch: so the cosine ranking for one query is the influence ranking with each training
example's score divided by the norm of its preconditioned vector. For a checkpoint ensemble
both vectors are concatenations over checkpoints, so cosine is the ensemble's (mean) score
divided by the norms over every checkpoint's layers: the cosine in the joint space, not the
mean of per-checkpoint cosines (the 1/C on the query cancels).

Searching stays exact: the main FAISS index holds unnormalised vectors, whose top-k by inner
product is not the top-k by cosine, so cosine search uses a second, flat (exact) FAISS index
over the unit-norm rows, ``index-<preconditioner key>-cosine.faiss`` beside the main one. It is
built from the stored sketches the first time a cosine search runs (or by
``AttributionIndex.prepare_cosine()``), saved when the directory is writable, and its name
follows the preconditioner, so a re-preconditioned index never serves a stale one (refits
remove it; the next cosine search builds the new one). Size: n_train × K float32, like a flat
main index.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..index import FaissIndexError, VectorIndex
from ..indexdir.errors import AttributionError
from ..indexdir.files import cosine_file_name

log = logging.getLogger("grass_index")

MODES = ("none", "cosine")


def check_normalize(mode) -> str:
    """'none' / 'cosine' (None means 'none'); anything else is an error naming the choices."""
    if mode is None:
        return "none"
    m = str(mode).strip().lower()
    if m not in MODES:
        raise AttributionError(f"unknown normalize mode {mode!r}; use 'none' (influence "
                               "scores) or 'cosine' (unit-norm query and training vectors)")
    return m


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero (their cosine is 0)."""
    a = np.asarray(a, dtype=np.float32)
    norm = np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True)
    return (a / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def cosine_file(idx) -> Path:
    return Path(idx.path) / cosine_file_name(idx.record.preconditioner_key)


def cosine_index(idx):
    """The exact FAISS index over unit-norm preconditioned training vectors (loaded, or built
    from the stored sketches and saved when possible)."""
    path = cosine_file(idx)
    if path.is_file():
        try:
            v = VectorIndex.load(path)
            if v.ntotal == idx.record.n_live and v.dim == idx.dim:
                return v
        except FaissIndexError as e:
            log.warning("%s is unreadable (%s); rebuilding it", path, e)
    v = VectorIndex.create(idx.dim, "flat")
    live = idx.record.generation.live_mask()
    for start, vec in idx.train_vectors():
        keep = live[start:start + len(vec)]  # a removed example is never returned
        v.add(unit_rows(vec[keep]), np.arange(start, start + len(vec), dtype=np.int64)[keep])
    try:
        v.save(path)
    except (OSError, FaissIndexError) as e:  # a read-only index still answers, from memory
        log.info("cosine index kept in memory (%s not writable: %s)", path, e)
    return v


def cosine_scores(idx, q) -> np.ndarray:
    """Exact cosine scores [n_query, n_train] from the stored sketches."""
    qn = unit_rows(np.asarray(q, dtype=np.float32))
    out = np.empty((len(qn), idx.n_train), dtype=np.float32)
    for start, vec in idx.train_vectors():
        out[:, start:start + len(vec)] = qn @ unit_rows(vec).T
    out[:, list(idx.record.removed)] = 0.0  # a removed example influences nothing
    return out
