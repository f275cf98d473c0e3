"""Two-stage search for wide vectors: FAISS over a compact seeded sketch, then an exact re-rank.

A preconditioned LM sketch is K = 196,608 floats (786 KB); a flat index over a million of them
would be 786 GB. FAISS instead holds S·v, a CountSketch (an SJLT with one nonzero per input
coordinate: coordinate j goes to bucket h(j) with sign s(j), drawn from ``seed``) of width d, so
⟨S·q, S·v⟩ is an unbiased estimate of ⟨q, v⟩. A query takes the top R·k candidates by that
estimate and re-scores them exactly (a caller-supplied function: the pipeline reads the
candidates' stored sketches), returning the top k by the exact score. The candidates' order is
then exact; only a true top-k row that the sketch ranks below R·k can be missed — recall@k is
measured at build time and recorded with the index. A build uses this only when the exact
index would not fit its memory budget, at the width and R its measured recall picks
(index/choice.py).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse

from ._file import FaissIndexError

DEFAULT_DIM = 4096  # the narrowest search sketch a build tries (index/choice.py)
DEFAULT_RERANK = 10  # the fewest candidates per requested result a build tries


class SearchSketch:
    """The seeded CountSketch R^K -> R^d (a sparse K×d matrix; apply with ``__call__``)."""

    def __init__(self, dim_in: int, dim: int, seed: int = 0):
        if not 0 < int(dim) <= int(dim_in):
            raise FaissIndexError(f"search sketch width must be in 1..{dim_in}, got {dim}")
        self.dim_in, self.dim, self.seed = int(dim_in), int(dim), int(seed)
        rng = np.random.default_rng([self.seed, self.dim_in, self.dim])
        rows = np.arange(self.dim_in)
        cols = rng.integers(0, self.dim, self.dim_in)
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), self.dim_in)
        self._S = scipy.sparse.csr_matrix((signs, (rows, cols)), shape=(self.dim_in, self.dim),
                                          dtype=np.float32)

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise FaissIndexError(f"vectors must have shape (n, {self.dim_in}), got {x.shape}")
        return np.ascontiguousarray((self._S.T @ x.T).T, dtype=np.float32)

    def describe(self) -> dict:
        return {"kind": "countsketch", "dim_in": self.dim_in, "dim": self.dim, "seed": self.seed}


Rerank = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (queries [m,K], ids [m,c]) -> [m,c]


class SketchedIndex:
    """A VectorIndex over search sketches that takes and returns full-width vectors/scores.

    ``rerank`` (set with :meth:`with_rerank`) gives the exact scores of candidate ids; without
    it, search returns the sketch's estimates (what verify and building need).

    ``raw_rows``: FAISS holds sketches of the *raw* rows S·ĝ, not of the preconditioned
    S·(F+λI)⁻¹ĝ; a query is then preconditioned first (``precondition``, set with
    :meth:`with_rerank`), sketched and searched, and its candidates re-ranked against the raw
    rows: ⟨S·Pq, S·ĝ⟩ estimates ⟨Pq, ĝ⟩ = ⟨q, Pĝ⟩ (P symmetric). A build then never multiplies
    a row by an inverse, and a refit leaves FAISS as it is."""

    def __init__(self, inner, sketch: SearchSketch, rerank_factor: int = DEFAULT_RERANK,
                 rerank: Rerank | None = None, *, raw_rows: bool = False,
                 precondition: Callable[[np.ndarray], np.ndarray] | None = None):
        if inner.dim != sketch.dim:
            raise FaissIndexError(f"the FAISS index is {inner.dim}-d but the search sketch "
                                  f"is {sketch.dim}-d; rebuild the index")
        self.inner, self.sketch = inner, sketch
        self.rerank_factor = int(rerank_factor)
        self.rerank = rerank
        self.dim = sketch.dim_in
        self.raw_rows, self.precondition = bool(raw_rows), precondition

    def with_rerank(self, rerank: Rerank | None,
                    precondition: Callable[[np.ndarray], np.ndarray] | None = None
                    ) -> "SketchedIndex":
        """This index re-ranking with ``rerank``; over raw rows, queries are preconditioned by
        ``precondition`` first (the rerank then gets the preconditioned queries)."""
        if self.raw_rows and rerank is not None and precondition is None:
            raise FaissIndexError("a search sketch over raw rows needs the preconditioner to "
                                  "search with")
        return SketchedIndex(self.inner, self.sketch, self.rerank_factor, rerank,
                             raw_rows=self.raw_rows, precondition=precondition)

    # the VectorIndex surface the pipeline uses --------------------------------------------------
    def __getattr__(self, name):  # kind, dtype, ntotal, nlist, nprobe, save, ids, ...
        return getattr(self.__dict__["inner"], name)

    @property
    def recall(self):
        return self.inner.recall

    @recall.setter
    def recall(self, value):
        self.inner.recall = value

    def stored_form(self, vectors) -> np.ndarray:
        """What FAISS holds for full-width ``vectors`` (compare with :meth:`reconstruct`)."""
        return self.sketch(vectors)

    def add(self, vectors, ids) -> None:
        self.inner.add(self.sketch(vectors), ids)

    def search(self, queries, k: int, *, opponents: bool = False, nprobe: int | None = None):
        """Top-k by exact score among the top R·k by sketched score (exact scores returned);
        without a rerank function, the sketched scores of the top k."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise FaissIndexError(f"queries must have shape (n, {self.dim}), got {q.shape}")
        if self.precondition is not None:
            q = np.ascontiguousarray(self.precondition(q), dtype=np.float32)
        if self.rerank is None:
            return self.inner.search(self.sketch(q), k, opponents=opponents, nprobe=nprobe)
        kk = min(int(k), self.ntotal)
        cand_scores, cand = self.inner.search(self.sketch(q), kk * self.rerank_factor,
                                              opponents=opponents, nprobe=nprobe)
        exact = np.asarray(self.rerank(q, np.where(cand >= 0, cand, 0)), dtype=np.float32)
        bad = np.inf if opponents else -np.inf
        exact[cand < 0] = bad
        order = np.argsort(exact if opponents else -exact, axis=1, kind="stable")[:, :kk]
        return (np.take_along_axis(exact, order, 1),
                np.where(np.take_along_axis(exact, order, 1) == bad, -1,
                         np.take_along_axis(cand, order, 1)))

    def describe(self) -> dict:
        d = dict(self.inner.describe())
        d.update(search_sketch=self.sketch.describe(), rerank_factor=self.rerank_factor,
                 full_dim=self.dim)
        if self.raw_rows:
            d["raw_rows"] = True
        return d

    @classmethod
    def wrap(cls, inner, meta: dict | None):
        """``inner`` itself, or wrapped when ``meta`` (an index's describe()) names a sketch."""
        s = (meta or {}).get("search_sketch")
        if not s:
            return inner
        return cls(inner, SearchSketch(s["dim_in"], s["dim"], s["seed"]),
                   meta.get("rerank_factor", DEFAULT_RERANK),
                   raw_rows=bool(meta.get("raw_rows")))
