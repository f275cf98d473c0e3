"""`run_eval`: LDS of an index directory against (cached) retrained-model ground truth.

This is what ``grass-index eval DIR --task FILE`` calls (the task the index was built from;
an index's recorded task is never run unasked). The task must
define ``train(train_data_subset, seed)`` (see groundtruth.py) so subsets can be retrained.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..attribute import AttributionIndex, open_index
from .inputs import (default_ground_truth_dir, retraining_inputs,  # noqa: F401  (re-exported)
                     ground_truth_for, task_of_index, task_train_fn)
from .lds import lds
from .subsets import make_subsets
from .errors import EvalError


@dataclass
class EvalResult:
    """LDS of one index. ``per_query`` is NaN where the correlation is undefined."""

    lds: float
    per_query: np.ndarray
    n_query: int
    n_subsets: int
    alpha: float
    seeds: list[int]
    ground_truth_dir: str
    index_dir: str | None = None
    seconds: dict = field(default_factory=dict)   # ground_truth / score wall time

    def to_dict(self) -> dict:
        d = asdict(self)
        pq = self.per_query
        d["per_query"] = [None if not np.isfinite(v) else float(v) for v in pq]
        d["per_query_std"] = float(np.nanstd(pq))
        return d


def run_eval(index, *, task=None, num_subsets: int = 50, alpha: float = 0.5,
             seeds: Sequence[int] = (0, 1, 2), subset_seed: int = 0,
             ground_truth: str | os.PathLike | None = None, max_queries: int | None = None,
             progress: bool = True) -> EvalResult:
    """Train (or reuse) ground truth for the index's task, score its query data, return LDS.

    index: a directory or an opened AttributionIndex. task: a task reference or loaded task
    (required: the task the index records is never run unasked). max_queries: score only
    the first N query examples (the ground truth covers all of them, since retraining
    dominates the cost).
    """
    idx = index if isinstance(index, AttributionIndex) else open_index(index)
    task, train_fn, train, query = retraining_inputs(idx, task, "eval", "evaluate")
    if max_queries is not None and max_queries < 1:
        raise EvalError(f"max_queries={max_queries}; pass a positive number or leave it out")

    subsets = make_subsets(len(train), num_subsets, alpha, subset_seed)
    t0 = time.perf_counter()
    gt, gt_dir = ground_truth_for(task, train, query, train_fn, subsets, seeds, ground_truth,
                                  m=num_subsets, alpha=alpha, subset_seed=subset_seed,
                                  progress=progress)
    t1 = time.perf_counter()
    n_q = len(query) if max_queries is None else min(max_queries, len(query))
    from torch.utils.data import Subset

    q_items = query if n_q == len(query) else Subset(query, list(range(n_q)))
    scores = idx.score(task.index_model(), q_items, task.loss, collate=task.collate)
    t2 = time.perf_counter()
    mean, per_query = lds(scores, gt.subsets, gt.losses[:, :n_q])
    return EvalResult(lds=mean, per_query=per_query, n_query=n_q, n_subsets=num_subsets,
                      alpha=alpha, seeds=list(gt.seeds), ground_truth_dir=str(gt_dir),
                      index_dir=str(idx.path),
                      seconds={"ground_truth": t1 - t0, "score": t2 - t1})
