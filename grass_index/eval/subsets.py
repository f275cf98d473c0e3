"""Random training subsets for the linear datamodeling score (LDS).

A subset is stored as one row of a boolean membership matrix ``[m, n]`` (row j marks the
training examples in S_j). Masks make the LDS prediction a single matrix product and are
trivially saved/compared; ``as_masks`` also accepts index lists.
"""
from __future__ import annotations


from typing import Sequence

import numpy as np

from .errors import EvalError


def make_subsets(n: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """M seeded random subsets of ``round(alpha*n)`` of the n training examples, as bool ``[m, n]``.

    Every subset has exactly the same size (the LDS compares models trained on equal amounts
    of data, so only *which* examples are in S varies), drawn without replacement.
    """
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise EvalError(f"make_subsets: n={n!r} training examples; need an integer >= 2")
    if not isinstance(m, (int, np.integer)) or m < 3:
        raise EvalError(f"make_subsets: m={m!r} subsets; a Spearman correlation across subsets "
                         "needs at least 3 (the field uses 50-100)")
    if not (0.0 < float(alpha) < 1.0):
        raise EvalError(f"make_subsets: alpha={alpha!r}; it is the fraction of training data "
                         "per subset and must lie strictly between 0 and 1 (default 0.5)")
    size = int(round(alpha * n))
    if size < 1 or size >= n:
        raise EvalError(f"make_subsets: alpha={alpha} of n={n} gives subsets of {size} examples; "
                         "pick alpha so that 1 <= alpha*n < n")
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks


def as_masks(subsets, n: int | None = None) -> np.ndarray:
    """Normalise subsets (bool ``[m, n]`` array, or a list of index arrays) to bool ``[m, n]``."""
    if isinstance(subsets, np.ndarray) and subsets.dtype == bool:
        if subsets.ndim != 2:
            raise EvalError(f"subsets: expected a bool [m, n_train] membership matrix, got shape "
                             f"{subsets.shape}")
        if n is not None and subsets.shape[1] != n:
            raise EvalError(f"subsets cover {subsets.shape[1]} training examples but there are {n}; "
                             "make them with make_subsets(n_train, ...) for this training set")
        return subsets
    try:
        import torch

        if isinstance(subsets, torch.Tensor):
            return as_masks(subsets.cpu().numpy().astype(bool) if subsets.dtype == torch.bool
                            else [np.asarray(r) for r in subsets.cpu().numpy()], n)
    except ImportError:  # pragma: no cover
        pass
    rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in subsets]
    if n is None:
        n = 1 + max((int(r.max()) for r in rows if r.size), default=0)
    masks = np.zeros((len(rows), n), dtype=bool)
    for j, r in enumerate(rows):
        if r.size and (r.min() < 0 or r.max() >= n):
            raise EvalError(f"subset {j} holds train id {int(r.max() if r.max() >= n else r.min())} "
                             f"outside 0..{n - 1}; subsets must index the training set")
        masks[j, r] = True
    return masks


def subset_indices(mask_row: np.ndarray) -> Sequence[int]:
    """The train ids in one subset (row of the membership matrix), as a plain int list."""
    return np.flatnonzero(mask_row).tolist()
