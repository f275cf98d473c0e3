"""`tune`: choose the preconditioner of an index by LDS on a validation split of its queries.

The right damping is task-dependent and matters a lot (on digits, LDS 0.24 at 1e-3 × mean
eigenvalue vs 0.52 at 0.3; on some tasks raw gradients beat any eFIM). So, given ground truth
from retrained models (the same cache `eval` uses), every candidate preconditioner is scored
on a validation half of the queries and the winner is checked on the other, held-out half.

Why it is cheap: the LDS of a query only needs the predicted effect of each subset S_m,
    Σ_{i∈S_m} q̂ᵀ (F + λI)⁻¹ ĝ_i  =  q̂ᵀ (F + λI)⁻¹ G_m,   G_m = Σ_{i∈S_m} ĝ_i,
so one pass over the stored raw sketches collects G [m, K] and the Fisher; with one
eigendecomposition F_l = U_l diag(e_l) U_lᵀ per layer, each grid point is a [n_query, k] ×
[k, m] product. No gradient is recomputed and FAISS is rewritten once, for the winner, by
``AttributionIndex.reprecondition``.

Candidates: ``identity`` (raw inner products), ``eFIM`` with per-layer relative damping
(λ_l = f × mean eigenvalue of F_l: the library's ``damping=f``), ``eFIM`` with one global
damping (λ = f × mean eigenvalue over all layers: ``damping="abs:λ"``), and — when pass 1 kept
Kronecker factors (a factored spec with an identity projection) — ``ekfac`` with per-layer
relative damping (its eigenvalues are corrected from the same pass over the sketches), f over
a log grid; plus the spectrum rule ``damping="auto"`` (the library's default) for each
Hessian. While a scope's best sits at an edge of the grid, the grid grows that way
(``extend_grid``) up to the identity limit, so a best damping beyond the default grid is found,
not clipped.

The grid is in units of each layer's mean eigenvalue (the meaning of a numeric damping), not
relative to the index's current damping or to the default: "auto" places λ per layer by the
shape of its spectrum, so there is no single factor to scale it by. The "auto" candidate is
always scored beside the grid, so on the validation queries tune never chooses worse than the
default; its choice is recorded as the damping string ``reprecondition`` takes ("1.0",
"abs:…", "auto").
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import option
from ..precondition import FisherAccumulator, load_factors
from ..precondition.damping import RELATIVE_RANGE, auto_damping
from ..precondition.ekfac import corrected_eigenvalues, rotate
from ..precondition.fisher import layer_slices
from ..query.querying import reading_store
from .errors import EvalError
from .inputs import ground_truth_for, retraining_inputs
from .subsets import make_subsets

DEFAULT_FACTORS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
SCOPES = ("per-layer", "global", "ekfac")


@dataclass
class Candidate:
    """One grid point: what to pass to reprecondition, and its LDS on both query splits."""

    name: str
    hessian: str
    damping: str | None          # the reprecondition argument (relative factor or "abs:λ")
    scope: str                   # identity | per-layer | global | ekfac
    factor: float | None         # × mean eigenvalue (per layer or global)
    val_lds: float = float("nan")
    heldout_lds: float = float("nan")


@dataclass
class TuneResult:
    """The sweep, the winner (by validation LDS) and where it came from."""

    grid: list[Candidate]
    choice: Candidate
    n_val: int
    n_heldout: int
    n_subsets: int
    alpha: float
    seeds: list[int]
    split_seed: int
    ground_truth_dir: str
    applied: bool = False
    seconds: dict = field(default_factory=dict)
    extended: list = field(default_factory=list)  # Extension dicts: where the grid grew, why

    def best(self, scope: str) -> Candidate:
        """The grid point of ``scope`` with the highest validation LDS."""
        pts = [c for c in self.grid if c.scope == scope]
        return max(pts, key=lambda c: c.val_lds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best_by_scope"] = {s: self.best(s).name for s in
                              dict.fromkeys(c.scope for c in self.grid)}
        return _finite(d)

    def record(self) -> dict:
        """What goes into the index config (``config["tune"]``); ``info`` shows it."""
        d = self.to_dict()
        d.pop("applied", None)
        d["choice"] = {k: d["choice"][k] for k in ("name", "hessian", "damping", "val_lds",
                                                    "heldout_lds")}
        return d


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float):
        return round(x, 6) if np.isfinite(x) else None
    return x


def make_grid(factors: Sequence[float] = DEFAULT_FACTORS, scopes: Sequence[str] = SCOPES,
              global_mean_eig: float | None = None) -> list[Candidate]:
    """identity, then eFIM at every factor for each scope. ``global`` needs the mean
    eigenvalue over all layers to turn a factor into the absolute λ reprecondition takes."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise EvalError(f"unknown damping scope(s) {bad}; use {', '.join(SCOPES)}")
    fs = [float(f) for f in factors]
    if not fs or any(not np.isfinite(f) or f <= 0 for f in fs):
        raise EvalError(f"damping factors {list(factors)}: give positive numbers, e.g. "
                        "0.001,0.01,0.1,1,10")
    grid = [Candidate("identity", "identity", None, "identity", None)]
    for scope in scopes:
        grid.extend(candidate(scope, f, global_mean_eig) for f in fs)
    return grid


def candidate(scope: str, f: float, global_mean_eig: float | None = None) -> Candidate:
    """The grid point of ``scope`` at factor ``f`` (× mean eigenvalue)."""
    if scope == "per-layer":
        return Candidate(f"eFIM {f:g} × mean eig per layer", "eFIM", repr(f), scope, f)
    if scope == "ekfac":
        return Candidate(f"EK-FAC {f:g} × mean eig per layer", "ekfac", repr(f), scope, f)
    lam = f * float(global_mean_eig if global_mean_eig is not None else 1.0)
    return Candidate(f"eFIM {f:g} × mean eig (global)", "eFIM", f"abs:{lam!r}", scope, f)


# Extending the grid. Past λ = IDENTITY_LIMIT × the top eigenvalue of every layer,
# (F + λI)^-1 = (I − F/λ + …)/λ differs from I/λ by under 1/IDENTITY_LIMIT: each layer's
# scores are identity's up to the factor 1/λ_l, and larger factors change nothing more.
# Downwards the grid stops at the smallest relative damping the library accepts.
IDENTITY_LIMIT = 100.0
MAX_EXTENSION = 24  # grid points added per scope and direction (1-3 steps: 12 decades)


def next_factor(f: float, up: bool) -> float:
    """The next point of a 1-3-10 log grid from ``f`` (×3 or ×10/3; ×/÷√10 off that grid)."""
    mantissa = f / 10 ** np.floor(np.log10(f))
    if np.isclose(mantissa, 1.0):
        g = f * 3 if up else f * 0.3
    elif np.isclose(mantissa, 3.0):
        g = f * 10 / 3 if up else f / 3
    else:
        g = f * 10 ** 0.5 if up else f / 10 ** 0.5
    return float(f"{g:.6g}")


@dataclass
class Extension:
    """How far one scope's grid grew past an edge, and why it stopped."""

    scope: str
    added_low: list = field(default_factory=list)    # factors added below the grid, outwards
    added_high: list = field(default_factory=list)   # factors added above it, outwards
    stopped: str = "interior"  # interior | flat | identity limit | smallest damping | step limit

    def says(self) -> str:
        """One line for the CLI."""
        parts = [f"down to {self.added_low[-1]:g}×" if self.added_low else "",
                 f"up to {self.added_high[-1]:g}×" if self.added_high else ""]
        where = " and ".join(p for p in parts if p)
        why = {"interior": "the best is now inside the grid",
               "identity limit": f"λ ≥ {IDENTITY_LIMIT:g} × every layer's top eigenvalue: "
                                 "beyond, each layer's scores are identity's up to 1/λ",
               "smallest damping": "the smallest damping the library accepts",
               "step limit": f"{MAX_EXTENSION} points added",
               "flat": "the LDS stopped changing at that edge"}[self.stopped]
        return f"{self.scope}: the best sat at the grid's edge; extended {where} ({why})"


def extend_grid(points: list[Candidate], make, score, *, high: float, low: float
                ) -> tuple[list[Candidate], Extension | None]:
    """Grow one scope's grid ``points`` outwards while its best validation LDS sits at an
    edge and is strictly above its neighbour's (a plateau says nothing about where to go: the
    LDS of a few queries is often flat at the small-damping end). ``make(f)`` builds a point,
    ``score(c)`` fills its LDS; ``high`` is the identity limit's factor, ``low`` the smallest
    factor allowed. Returns the points added (low end first) and what happened (None when
    nothing was added)."""
    pts = sorted(points, key=lambda c: c.factor)
    ext = Extension(points[0].scope, stopped="step limit")
    for _ in range(MAX_EXTENSION):
        best = max(pts, key=_val)  # ties: the smaller damping, as the sweep does
        if best in (pts[0], pts[-1]) and len(pts) > 1 and \
                _val(best) == _val(pts[1] if best is pts[0] else pts[-2]):
            ext.stopped = "flat"  # no slope towards the edge: nothing says go further
            break
        if best is pts[-1]:
            if pts[-1].factor >= high:
                ext.stopped = "identity limit"
                break
            pts.append(score(make(min(next_factor(pts[-1].factor, up=True), high))))
            ext.added_high.append(pts[-1].factor)
        elif best is pts[0]:
            if pts[0].factor <= low:
                ext.stopped = "smallest damping"
                break
            pts.insert(0, score(make(max(next_factor(pts[0].factor, up=False), low))))
            ext.added_low.append(pts[0].factor)
        else:
            ext.stopped = "interior"
            break
    if not (ext.added_low or ext.added_high):
        return [], None
    return pts[:len(ext.added_low)] + pts[len(pts) - len(ext.added_high):], ext


def _val(c: Candidate) -> float:
    return c.val_lds if np.isfinite(c.val_lds) else -np.inf


def auto_candidates(scopes: Sequence[str]) -> list[Candidate]:
    """The library's spectrum rule (damping "auto", precondition.damping.auto_damping) for
    eFIM and, when EK-FAC is swept, for EK-FAC: shown beside the grid, and chosen if it wins."""
    out = []
    if "per-layer" in scopes or "global" in scopes:
        out.append(Candidate("eFIM auto (spectrum rule)", "eFIM", "auto", "auto", None))
    if "ekfac" in scopes:
        out.append(Candidate("EK-FAC auto (spectrum rule)", "ekfac", "auto", "ekfac auto", None))
    return out


def split_queries(n_query: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (validation ids, held-out ids), both sorted; each gets at least one query."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise EvalError(f"val_fraction={val_fraction!r}; it is the share of queries used to "
                        "choose and must lie strictly between 0 and 1 (default 0.5)")
    n_val = int(round(val_fraction * n_query))
    if n_query < 2 or not 1 <= n_val < n_query:
        raise EvalError(f"{n_query} query examples cannot be split {val_fraction:g} / "
                        f"{1 - val_fraction:g}; tune needs at least 2 queries")
    perm = np.random.default_rng(seed).permutation(n_query)
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


class _Sweep:
    """Subset sums of the raw sketches and the per-layer eigenbases: everything a grid point
    needs. ``predicted(c)`` is [m, n_query]: the subset effects under candidate c."""

    def __init__(self, idx, masks: np.ndarray, q: np.ndarray):
        layout = idx.layout
        acc = FisherAccumulator(layout)
        G = np.zeros((masks.shape[0], idx.dim))
        w = masks.astype(np.float64)
        factors = stored_factors(idx)
        usable = [n for n in factors.usable() if n in layout] if factors is not None else []
        bases = {name: factors.eigenbases(name) for name in usable}
        slices = layer_slices(layout)

        def rows():  # one read of the store feeds the Fisher, the subset sums and EK-FAC's Λ
            nonlocal G
            for start, raw in idx.raw_sketches():
                raw = np.asarray(raw, dtype=np.float32)
                acc.update(raw)  # same rows, same order as pass 2: the same Fisher
                G += w[:, start:start + len(raw)] @ raw.astype(np.float64)
                yield start, raw
        eig = corrected_eigenvalues(rows(), layout, bases)
        self.q, self.G = np.asarray(q, dtype=np.float64), G
        # per EK-FAC layer: (Λ, rotated queries, rotated subset sums)
        self.ekfac = {name: (eig[name], rotate(self.q[:, slices[name]], *bases[name]),
                             rotate(G[:, slices[name]], *bases[name])) for name in usable}
        self.layers = []
        total_trace, total_k, start = 0.0, 0, 0
        for name, k in layout.items():
            F = acc.fisher(name)
            F = (F + F.T) / 2
            e, U = np.linalg.eigh(F)
            sl = slice(start, start + k)
            self.layers.append((name, e, self.q[:, sl] @ U, self.G[:, sl] @ U,
                                float(np.trace(F)) / k))
            total_trace += float(np.trace(F))
            total_k += k
            start += k
        self.global_mean_eig = total_trace / total_k

    def factor_limits(self, scope: str) -> tuple[float, float]:
        """(smallest, largest) factor worth trying for ``scope``: the library's smallest
        relative damping, and the identity limit — λ = IDENTITY_LIMIT × the top eigenvalue of
        every layer (capped at the largest relative damping accepted)."""
        tops = []
        for name, e, _, _, mean_eig in self.layers:
            if scope == "ekfac" and name in self.ekfac:
                e = self.ekfac[name][0]
                mean_eig = float(np.mean(e))
            scale = self.global_mean_eig if scope == "global" else mean_eig
            if scale > 0:
                tops.append(float(np.max(e)) / scale)
        high = IDENTITY_LIMIT * max(tops, default=1.0)
        return RELATIVE_RANGE[0], float(f"{min(high, RELATIVE_RANGE[1]):.3g}")

    def predicted(self, c: Candidate) -> np.ndarray:
        if c.hessian == "identity":
            return self.G @ self.q.T
        out = np.zeros((self.G.shape[0], self.q.shape[0]))
        for name, e, qU, GU, mean_eig in self.layers:
            if c.hessian == "ekfac" and name in self.ekfac:
                lam_diag, qR, GR = self.ekfac[name]
                lam = auto_damping(lam_diag) if c.factor is None else \
                    c.factor * lam_diag.mean()
                out += GR @ (qR / (lam_diag + lam)).T
                continue  # (layers without factors: eFIM, as Preconditioner.fit_ekfac does)
            if c.factor is None:  # damping "auto": the rule on this layer's spectrum
                lam = auto_damping(e)
            else:
                lam = c.factor * (mean_eig if c.scope != "global" else self.global_mean_eig)
            out += GU @ (qU / (e + lam)).T
        return out


def stored_factors(idx):
    """The Kronecker factors pass 1 kept in the index's store (None when there are none)."""
    with reading_store(idx.path) as store:
        f = load_factors(store)
        return f if f is not None and f.blocks == store.committed_blocks else None


def _lds_of(pred: np.ndarray, losses: np.ndarray, ids: np.ndarray) -> float:
    """Mean over queries ``ids`` of Spearman ρ(pred[:, q], −losses[:, q]), the LDS of
    grass_index.eval.lds, vectorised over queries (a sweep evaluates thousands of them):
    average ranks, then Pearson; queries with constant predictions or losses are left out."""
    from scipy.stats import rankdata

    a = rankdata(pred[:, ids], axis=0)
    b = rankdata(-losses[:, ids], axis=0)
    a -= a.mean(0)
    b -= b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    ok = den > 0
    if not ok.any():
        return float("nan")
    return float(((a * b).sum(0)[ok] / den[ok]).mean())


def tune_index(index, *, task=None, num_subsets: int = 50, alpha: float = 0.5,
               seeds: Sequence[int] = (0, 1, 2), subset_seed: int = 0,
               ground_truth: str | os.PathLike | None = None, val_fraction: float = 0.5,
               split_seed: int = 0, factors: Sequence[float] = DEFAULT_FACTORS,
               scopes: Sequence[str] | None = None, max_queries: int | None = None,
               apply: bool = True, progress: bool = True, prepared=None,
               extend: bool = True) -> TuneResult:
    """Sweep the grid, pick the best validation LDS, and (``apply``) make it the index's
    preconditioner, recording the sweep in ``config["tune"]``.

    Ground truth is ``eval``'s: trained once per (subset, seed) and cached (resumable), in the
    same default directory, so ``eval`` and ``tune`` with the same m / alpha / subset seed
    share it. The split is seeded; ``heldout_lds`` of the choice is an unbiased estimate, the
    validation LDS of the winner is not. ``extend``: while a scope's best sits at an edge of
    ``factors``, add grid points beyond it (up to the identity limit, see :func:`extend_grid`);
    ``TuneResult.extended`` says where it went and why it stopped. ``prepared`` (from
    :func:`prepare`) reuses the ground truth and the sweep's sums across calls, e.g. to compare
    split seeds.
    """
    scopes_given = scopes is not None  # the default tries EK-FAC only where it exists
    scopes = list(SCOPES if scopes is None else scopes)
    make_grid(factors, scopes)  # bad factors/scopes fail before any model is retrained
    t0 = time.perf_counter()
    p = prepared or prepare(index, task=task, num_subsets=num_subsets, alpha=alpha, seeds=seeds,
                            subset_seed=subset_seed, ground_truth=ground_truth,
                            max_queries=max_queries, progress=progress)
    val_ids, held_ids = split_queries(p.losses.shape[1], val_fraction, split_seed)
    t1 = time.perf_counter()
    if "ekfac" in scopes and not p.sweep.ekfac:
        if list(scopes) == ["ekfac"] or scopes_given:
            raise EvalError(f"index {p.index.path} holds no Kronecker factors, so EK-FAC cannot "
                            "be tried: build it with a factored sparsification and "
                            f"{option('projection', 'identity')} (e.g. random_mask-32*32), or "
                            f"leave ekfac out of {option('scopes')}")
        scopes = [s for s in scopes if s != "ekfac"]
    def score(c: Candidate) -> Candidate:
        pred = p.sweep.predicted(c)
        c.val_lds = _lds_of(pred, p.losses, val_ids)
        c.heldout_lds = _lds_of(pred, p.losses, held_ids)
        return c

    grid = [score(c) for c in make_grid(factors, scopes, p.sweep.global_mean_eig)]
    extensions = []
    if extend:
        grid, extensions = _extended(grid, scopes, p.sweep, score)
    grid[1:1] = [score(c) for c in auto_candidates(scopes)]
    ok = [c for c in grid if np.isfinite(c.val_lds)]
    if not ok:
        raise EvalError("no grid point has a defined validation LDS (scores or losses constant "
                        "across subsets); check that the retrained models differ")
    choice = max(ok, key=lambda c: c.val_lds)  # ties: the earlier (simpler) grid point
    t2 = time.perf_counter()
    res = TuneResult(grid=grid, choice=choice, n_val=len(val_ids), n_heldout=len(held_ids),
                     n_subsets=p.n_subsets, alpha=p.alpha, seeds=list(p.seeds),
                     split_seed=split_seed, ground_truth_dir=p.ground_truth_dir,
                     seconds={"prepare": t1 - t0, "sweep": t2 - t1},
                     extended=[asdict(e) for e in extensions])
    if apply:
        # the record goes into the config the refit writes (later refits keep it only while
        # the index's hessian/damping stay the tuned choice)
        p.index.reprecondition(damping=choice.damping, hessian=choice.hessian,
                               progress=progress, tune=res.record())
        res.applied = True
        res.seconds["reprecondition"] = time.perf_counter() - t2
    return res


def _extended(grid: list[Candidate], scopes, sweep, score) -> tuple[list[Candidate], list]:
    """The grid with every scope extended past an edge its best sits at (see extend_grid),
    each scope's points in increasing damping; and the extensions made."""
    out, extensions = [c for c in grid if c.scope == "identity"], []
    for scope in scopes:
        pts = [c for c in grid if c.scope == scope]
        low, high = sweep.factor_limits(scope)
        added, ext = extend_grid(pts, lambda f, s=scope: candidate(s, f, sweep.global_mean_eig),
                                 score, high=high, low=low)
        out.extend(sorted(pts + added, key=lambda c: c.factor) if added else pts)
        if ext is not None:
            extensions.append(ext)
    return out, extensions


def _opened(index):
    """tune runs below the façade: it takes an opened index (``open_index(DIR)``, or call
    ``AttributionIndex.tune``), never a directory it would open itself."""
    if isinstance(index, (str, os.PathLike)):
        raise EvalError(f"tune takes an opened index, not the path {str(index)!r}: use "
                        "grass_index.open_index(DIR).tune(...)")
    return index


@dataclass
class Prepared:
    """Ground truth and the sweep's sums for one index and task (see :func:`prepare`)."""

    index: object
    sweep: _Sweep
    losses: np.ndarray          # [m, n_query] seed-averaged losses of the retrained models
    n_subsets: int
    alpha: float
    seeds: list[int]
    ground_truth_dir: str


def prepare(index, *, task=None, num_subsets: int = 50, alpha: float = 0.5,
            seeds: Sequence[int] = (0, 1, 2), subset_seed: int = 0,
            ground_truth: str | os.PathLike | None = None, max_queries: int | None = None,
            progress: bool = True) -> Prepared:
    """The expensive part of tune: ground truth (cached), query sketches, one pass over the
    stored sketches and one eigendecomposition per layer."""
    idx = _opened(index)
    task, train_fn, train, query = retraining_inputs(idx, task, "tune", "tune")
    if max_queries is not None and max_queries < 2:
        raise EvalError(f"max_queries={max_queries}; pass at least 2 or leave it out")
    n_q = len(query) if max_queries is None else min(max_queries, len(query))
    split_queries(n_q, 0.5, 0)  # too few queries: say so before retraining anything

    masks = make_subsets(len(train), num_subsets, alpha, subset_seed)
    gt, gt_dir = ground_truth_for(task, train, query, train_fn, masks, seeds, ground_truth,
                                  m=num_subsets, alpha=alpha, subset_seed=subset_seed,
                                  progress=progress)
    from torch.utils.data import Subset

    q_items = query if n_q == len(query) else Subset(query, list(range(n_q)))
    q = idx.query_sketches(task.index_model(), q_items, task.loss,
                           collate=task.collate).numpy()
    return Prepared(index=idx, sweep=_Sweep(idx, masks, q), losses=gt.losses[:, :n_q],
                    n_subsets=num_subsets, alpha=alpha, seeds=list(gt.seeds),
                    ground_truth_dir=str(gt_dir))
