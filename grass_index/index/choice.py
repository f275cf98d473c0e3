"""Which search a build's index uses: exact FAISS over the full vectors whenever they fit the
memory budget; otherwise the narrowest search sketch and the smallest re-rank factor R whose
recall@k, measured on this build's own vectors, reaches the target.

Why measure instead of fixing width 4096 and R = 10: recall depends on how concentrated the
preconditioned scores are, which the corpus decides. On a 4-layer GPT-2 over 210 lines of
English, width 4096 with R = 10 kept 0.549 of the true top 10, while the exact index of those
210 × 65,536 floats is 55 MB (README "FAISS at scale").

The measurement costs no extra pass: while pass 2 streams the preconditioned vectors into FAISS
(pipeline/pass2.py), each candidate width's sketch of every block is scored against the recall
queries and the top (k+1)·R_max ids kept (:class:`SketchTopLists`). With the exact search,
the two-stage search's final top k holds exactly the true top-k ids that the sketch ranked among
its (k+1)·R candidates, so recall for every (width, R) follows from those lists
(:func:`predicted_recall`); the index actually built is then measured as before.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from ..errors import option
from .recall import ExactTopK, recall_at_k
from .search_sketch import DEFAULT_DIM, DEFAULT_RERANK, SearchSketch

log = logging.getLogger("grass_index")

TARGET_RECALL = 0.95  # recall@k a sketched search must reach
WIDTHS = (DEFAULT_DIM, 2 * DEFAULT_DIM, 4 * DEFAULT_DIM, 8 * DEFAULT_DIM)
RERANKS = (DEFAULT_RERANK, 2 * DEFAULT_RERANK, 5 * DEFAULT_RERANK)
BUDGET_SHARE = 0.5  # of the RAM available when pass 2 starts, for the index's vectors
# An exact index scans the store's own rows (no FAISS copy) when the preconditioner a query
# then applies is at most this share of the rows: its bytes are read per query on top of them
SCAN_FORMS_SHARE = 0.25


def default_budget() -> float:
    """Bytes the index's vectors may take: half the RAM available now (MemAvailable), or
    16 GB where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return BUDGET_SHARE * float(line.split()[1]) * 1024
    except OSError:
        pass
    return 16e9


class Choice(NamedTuple):
    """The search a build's index uses. ``width`` None: exact over the full K floats."""
    width: int | None
    rerank: int
    reason: str
    predicted: float | None = None  # recall@k the measurement predicts for (width, rerank)
    met: bool = True  # whether ``predicted`` reaches the target

    def record(self) -> dict:
        """What config.json's index.search holds."""
        d = dict(exact=self.width is None, reason=self.reason, target_recall=TARGET_RECALL)
        if self.width is not None:
            d.update(width=self.width, rerank=self.rerank, target_met=self.met)
        return d


def scans_store(spec, form_bytes: float, K: int, n: int) -> bool:
    """Whether an exact index is the sketch store's rows, scanned with preconditioned queries
    (grass_index/index/store_scan.py), instead of a FAISS copy of every preconditioned vector.

    A scan preconditions each query, reading the preconditioner's arrays (``form_bytes``): a
    dense k×k inverse per layer when n ≥ k, the n×n low-rank core per layer when n < k. That
    is cheap beside the n·K rows when n ≫ k or n ≪ k, and as large as them near n = k (GPT-2
    small at n = 4,096: 3.2 GB of inverses, 3.2 GB of rows), where the copy keeps queries at
    one read of the vectors. ``flat:faiss`` always writes the copy, ``flat:scan`` never."""
    return spec.scans_store and (spec.held == "store"
                                 or form_bytes <= SCAN_FORMS_SHARE * 4.0 * n * K)


def candidates(spec, K: int, n: int) -> tuple[list[int], list[int], str]:
    """(widths, reranks, why) to consider; no widths means exact search. The budget is the
    spec's ``budget=MB``, else :func:`default_budget`."""
    budget = spec.budget * 1e6 if spec.budget >= 0 else default_budget()
    exact_bytes = 4.0 * n * K
    if spec.sketch == 0 or spec.held == "store":  # a scan streams the rows: no RAM budget
        return [], [], "exact search (the index spec says so)"
    if spec.sketch < 0 and exact_bytes <= budget:
        # (the budget itself is left out: the config of the same build stays the same)
        return [], [], (f"exact search: n·K·4 = {exact_bytes / 1e6:,.1f} MB fits the memory "
                        "budget")
    reranks = [spec.rerank] if spec.rerank > 0 else list(RERANKS)
    if spec.sketch >= K:
        return [], [], f"exact search: the spec's sketch width {spec.sketch} is not below K = {K}"
    if spec.sketch > 0:
        return [spec.sketch], reranks, f"search sketch of width {spec.sketch} (the index spec)"
    widths = [w for w in WIDTHS if w < K and 4.0 * n * w <= budget] or [min(DEFAULT_DIM, K - 1)]
    return widths, reranks, (f"n·K·4 = {exact_bytes / 1e6:,.0f} MB exceeds the "
                             f"{budget / 1e6:,.0f} MB budget")


def planned_width(spec, K: int, n: int) -> int | None:
    """Floats per vector FAISS will hold, as far as it is known before pass 2: K for exact
    search, else the narrowest candidate width (the build may choose a wider one)."""
    widths, _, _ = candidates(spec, K, n)
    return widths[0] if widths else None


class SketchTopLists:
    """Per candidate width, the top (k+1)·R_max ids of the recall queries by sketched score,
    accumulated over streamed (vectors, ids) blocks (and mergeable across ranks)."""

    def __init__(self, queries, K: int, seed: int, widths, depth: int):
        self.sketches = {w: SearchSketch(K, w, seed) for w in widths}
        self.tops = {w: ExactTopK(s(queries), depth) for w, s in self.sketches.items()}

    def add(self, vectors, ids) -> None:
        for w, s in self.sketches.items():
            self.tops[w].add(s(vectors), ids)

    def state(self) -> dict:
        return {w: (t.scores, t.ids) for w, t in self.tops.items()}

    def merge(self, state: dict) -> None:
        for w, (scores, ids) in state.items():
            self.tops[w].merge(scores, ids)


def predicted_recall(sketch_ids: np.ndarray, exact_ids: np.ndarray, qids, k: int,
                     rerank: int) -> float:
    """recall@k of a two-stage search whose candidates are each query's first (k+1)·R ids of
    ``sketch_ids`` (best first) re-ranked exactly: its result is the true top ids found among
    the candidates, in exact order (then others, which never count)."""
    ranked = np.full(exact_ids.shape, -1, np.int64)
    for r, (row_e, row_c) in enumerate(zip(exact_ids, sketch_ids[:, : (k + 1) * rerank])):
        found = row_e[np.isin(row_e, row_c)]
        ranked[r, :len(found)] = found
    return recall_at_k(ranked, exact_ids, k, exclude=qids)


def choose(lists: SketchTopLists, exact_ids, qids, k: int, reranks, reason: str,
           n: int) -> Choice:
    """The narrowest width, then the smallest R, whose predicted recall reaches the target;
    else the best measured, flagged as not meeting it. An R whose (k+1)·R candidates would be
    over half the n examples is not tried (that re-ranks the corpus, not a search's shortlist),
    unless it is the only one."""
    usable = [R for R in sorted(reranks) if 2 * (k + 1) * R <= n] or [min(reranks)]
    best = None
    for w in sorted(lists.tops):
        ids = lists.tops[w].result()[1]
        for R in usable:
            r = predicted_recall(ids, exact_ids, qids, k, R)
            if r >= TARGET_RECALL:
                return Choice(w, R, reason, round(r, 4), True)
            if best is None or r > best[2]:
                best = (w, R, r)
    w, R, r = best
    log.warning("index: no search sketch reached recall@%d >= %.2f (best: width %d, rerank %d: "
                "%.3f); use %s for exact search or give it more memory",
                k, TARGET_RECALL, w, R, r, option("index", "flat:exact"))
    return Choice(w, R, reason, round(r, 4), False)
