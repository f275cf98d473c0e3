"""The linear datamodeling score (LDS; Park et al. 2023, "TRAK").

For a query z and subsets S_1..S_M of the training set, the attribution predicts the
effect of training on S_m as the group score  τ(z, S_m) = Σ_{i∈S_m} score(z, z_i).
Ground truth is the loss on z of models actually retrained on S_m (averaged over seeds).
LDS(z) = Spearman ρ( τ(z, S_·), −loss_·(z) ): with our sign convention (positive score =
proponent = lowers the loss on z), a perfect attribution ranks subsets exactly like −loss.
The reported LDS is the mean over query examples.
"""
from __future__ import annotations


import warnings

import numpy as np

from .subsets import as_masks
from .errors import EvalError


def _to_numpy(x, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise EvalError(f"lds: {name} must be 2-D, got shape {a.shape}")
    return a


def group_scores(scores, subsets) -> np.ndarray:
    """Predicted subset effects ``[m, n_query]``: Σ_{i∈S_m} score(z, z_i)."""
    s = _to_numpy(scores, "scores [n_query, n_train]")
    masks = as_masks(subsets, s.shape[1])
    return masks.astype(np.float64) @ s.T


def lds(scores, subsets, losses) -> tuple[float, np.ndarray]:
    """LDS of an attribution: ``(mean over queries, per-query Spearman ρ [n_query])``.

    scores: ``[n_query, n_train]`` (positive = proponent); subsets: bool ``[m, n_train]`` or
    index lists; losses: ``[m, n_query]`` loss of each query under the model trained on S_m.
    A query whose correlation is undefined (constant losses or scores across subsets) gets
    NaN in ``per_query`` and is left out of the mean, with a warning.
    """
    s = _to_numpy(scores, "scores [n_query, n_train]")
    y = _to_numpy(losses, "losses [m, n_query]")
    masks = as_masks(subsets, s.shape[1])
    m = masks.shape[0]
    if y.shape != (m, s.shape[0]):
        raise EvalError(f"lds: losses have shape {y.shape} but there are {m} subsets and "
                         f"{s.shape[0]} query examples in scores; expected losses [{m}, {s.shape[0]}] "
                         "(one row per subset, one column per query, same query order as scores)")
    if m < 3:
        raise EvalError(f"lds: {m} subsets; a rank correlation across subsets needs at least 3")
    for name, a in (("scores", s), ("losses", y)):
        if not np.isfinite(a).all():
            raise EvalError(f"lds: {name} contain NaN/inf ({int((~np.isfinite(a)).sum())} entries); "
                             "fix the attribution (e.g. larger damping) or the ground-truth training")
    from scipy.stats import spearmanr  # here: scipy.stats costs a query ~0.5-1 s to import

    pred = masks.astype(np.float64) @ s.T          # [m, n_query]
    per_query = np.full(s.shape[0], np.nan)
    for q in range(s.shape[0]):
        a, b = pred[:, q], -y[:, q]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue  # Spearman is undefined for a constant input
        per_query[q] = spearmanr(a, b).statistic
    ok = np.isfinite(per_query)
    if not ok.any():
        raise EvalError("lds: every query has constant scores or losses across subsets, so no "
                         "correlation is defined; check that the scores are not all zero and the "
                         "retrained models differ")
    if not ok.all():
        warnings.warn(f"lds: {int((~ok).sum())} of {len(ok)} queries have constant scores or "
                      "losses across subsets; left out of the mean", RuntimeWarning, stacklevel=2)
    return float(per_query[ok].mean()), per_query
