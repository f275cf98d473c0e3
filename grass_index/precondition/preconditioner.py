"""Per-layer preconditioner in sketch space: eFIM (F_l + λ_l I)^{-1}, EK-FAC (an
eigenvalue-corrected Kronecker approximation of F_l, see ekfac.py) or identity.

Index vectors are the concatenation of (F_l + λ_l I)^{-1} ĝ_l; queries stay raw, so the inner
product is score(z, z_i) = ĝ(z)ᵀ (F + λI)^{-1} ĝ(z_i) (positive = proponent).

Each layer keeps the form that fits it (forms.py): a layer with fewer rows than its width
(n < k) the exact low-rank form — Woodbury, (GᵀG/n + λI)^{-1} = (I − Gᵀ(nλI + GGᵀ)^{-1}G)/λ,
an n×n core over the stored rows, O(n²·k) to fit and no k×k Fisher; EK-FAC its Kronecker
eigenbasis and eigenvalues; only a full-rank layer (n ≥ k) a dense inverse, computed in float64
and kept in float32 (scores agree with float64 inverses to ~1e-6 relative, see
benchmarks/lm.py). Dense fitting goes one layer at a time and factors each Fisher sum in place
(LAPACK potrf/potri), so the peak is one set of Fisher sums, shrinking as the inverses grow.
"""
from __future__ import annotations

import json
from typing import Callable

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from .damping import (DEFAULT_DAMPING, format_damping, layer_damping, parse_damping,
                      placement, placement_without_spectrum)
from .eigen import eigenvalues as _eigenvalues
from .ekfac import ekfac_damping
from .errors import PreconditionError
from .fisher import as_float32, layer_slices
from .forms import (ARRAY_NAMES, INVERSE_DTYPE, Blocks, Dense, Ekfac, LowRank, Zero,
                    apply_low_rank_streamed, form_from_arrays, singular)


def uses_low_rank(n: int, k: int) -> bool:
    """A layer with fewer rows than its width (n < k) has a rank-n Fisher: it is kept in the
    low-rank form (an n×n core over the stored rows), never as a k×k matrix."""
    return 0 < int(n) < int(k)


def dense_layers(layout: dict[str, int], n: int) -> list[str]:
    """The layers whose preconditioner needs the k×k Fisher sum (all but the low-rank ones)."""
    return [name for name, k in layout.items() if not uses_low_rank(n, k)]


HESSIANS = ("eFIM", "identity", "ekfac")
STREAM_ROWS = 64  # batches up to this many vectors apply low-rank layers over streamed rows
_ALIASES = {"ek-fac": "ekfac"}
# float32's smallest normal number. Below it a value keeps fewer mantissa bits (a subnormal),
# and with flush-to-zero on (torch.set_flush_denormal, some BLAS builds) it is 0.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
# A layer's sketch block whose largest |entry| is at least this holds a full-precision signal
# with 8 decades of headroom above FLOAT32_TINY: a preconditioner that takes it below
# FLOAT32_TINY (or to inf) destroyed it, and the damping is to blame. A block below it is a
# saturated example (a classifier at a logit margin of ~90: loss 0, gradient ~1e-38, made of
# subnormals that flush-to-zero turns into 0 and that differ with it on or off): its influence
# is zero, which is the right answer, and it is stored as 0 (``zero_saturated_blocks``).
REPRESENTABLE = 1e-30


def _block_max(a: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """[rows, layers] largest |entry| of each layer's block (NaN stays NaN)."""
    return np.maximum.reduceat(np.abs(a), starts, axis=1) if a.size else \
        np.zeros((len(a), len(starts)), a.dtype)


def _starts(slices) -> np.ndarray:
    return np.array([sl.start for sl in slices.values()], dtype=np.intp)


def unrepresentable_rows(raw, vec, slices) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose preconditioning destroyed a signal float32 held, judged per layer against the
    row's own sketch (``slices``: layer -> column slice): (rows where a layer's sketch block is
    at least REPRESENTABLE but its preconditioned block fell below FLOAT32_TINY, rows whose
    preconditioned vector is not finite). Identity preconditioning (vec == raw) never has
    either; a saturated example's tiny sketch is not a casualty."""
    return guard_precision(raw, np.array(vec, dtype=np.float32), slices)[1:]


def zero_saturated_blocks(raw, vec: np.ndarray, slices) -> np.ndarray:
    """``vec`` with the layer blocks whose sketch (in ``raw``) is below REPRESENTABLE set to
    exactly 0, in place: a saturated example adds nothing to any score, and the index holds
    the same bytes with flush-to-zero on or off. Every other block is untouched."""
    return guard_precision(raw, vec, slices)[0]


def guard_precision(raw, vec: np.ndarray, slices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both rules over one chunk with one read of each array: (``vec`` with its saturated
    blocks zeroed in place, the rows the damping underflowed, the rows that overflowed)."""
    raw = np.asarray(raw)
    if not len(raw):
        return vec, np.zeros(0, np.intp), np.zeros(0, np.intp)
    starts = _starts(slices)
    raw_max = _block_max(raw, starts)
    tiny = raw_max < REPRESENTABLE  # saturated blocks: stored as 0, whatever their vector is
    vec_max = _block_max(vec, starts)
    broken = ~np.isfinite(vec_max) & ~tiny
    lost = ~tiny & (vec_max < FLOAT32_TINY)
    under = np.flatnonzero(lost.any(axis=1) & ~broken.any(axis=1))
    over = np.flatnonzero(broken.any(axis=1))
    if tiny.any():
        for j, sl in enumerate(slices.values()):
            rows = np.flatnonzero(tiny[:, j])
            if len(rows):
                vec[rows, sl] = 0
    return vec, under, over


def canonical_hessian(hessian: str) -> str:
    """The canonical spelling of a Hessian name ('efim' -> 'eFIM'); the one home of the names."""
    if isinstance(hessian, str):
        name = _ALIASES.get(hessian.lower(), hessian.lower())
        for h in HESSIANS:
            if name == h.lower():
                return h
    raise PreconditionError(f"unknown hessian {hessian!r}; choose one of {', '.join(HESSIANS)}")


_check_hessian = canonical_hessian  # the name used inside this module


_singular = singular  # the name used inside this module


def _inverse_in_place(name: str, A: np.ndarray, mode: str, value: float,
                      placements: dict | None = None) -> tuple[np.ndarray, float]:
    """(A + λI)^{-1} for a symmetric float64 C-ordered A, overwriting A (LAPACK potrf/potri on
    its lower triangle; only the float32 result is new). The mean eigenvalue is trace/k, so no
    eigendecomposition is needed (5.5 s vs 31.6 s for eigh at k=4096 on 2 cores) except for
    damping 'auto', which needs the eigenvalues (eigen.eigenvalues: torch's eigvalsh,
    2.5× the Cholesky and inverse). ``placements[name]``: where λ sits in the
    spectrum (damping.placement)."""
    k = A.shape[0]
    spectrum = {}

    def eigenvalues():
        spectrum["e"] = _eigenvalues(A)
        return spectrum["e"]
    lam = layer_damping(mode, value, float(np.trace(A)), k, eigenvalues)
    top = _top_eigenvalue(A) if placements is not None and "e" not in spectrum else None
    A.flat[:: k + 1] += lam
    At = A.T  # Fortran-ordered view of the same memory: LAPACK works on it without a copy
    c, info = lapack.dpotrf(At, lower=True, overwrite_a=True, clean=False)
    if info != 0 or not np.isfinite(lam):
        raise _singular(name, lam)
    inv, info = lapack.dpotri(c, lower=True, overwrite_c=True)
    if info != 0:
        raise _singular(name, lam)
    if placements is not None:
        placements[name] = placement(spectrum["e"], lam) if "e" in spectrum else \
            placement_without_spectrum(k, lam, float(np.trace(inv)), top)
    return _symmetric_float32(inv), float(lam)


def _top_eigenvalue(A: np.ndarray) -> float:
    """The largest eigenvalue of a symmetric A by Lanczos (a few dozen products with A: a few
    percent of its Cholesky at k ≥ 1024), for `info`'s placement of the damping."""
    from scipy.sparse.linalg import eigsh

    if A.shape[0] < 64:
        return float(scipy.linalg.eigvalsh(A, subset_by_index=[A.shape[0] - 1] * 2)[0])
    v0 = np.ones(A.shape[0])  # fixed start: the same value every time
    return float(eigsh(A, k=1, which="LA", tol=1e-3, v0=v0, return_eigenvectors=False)[0])


def _symmetric_float32(lower: np.ndarray) -> np.ndarray:
    """The full symmetric float32 matrix from a (Fortran) lower triangle."""
    low = np.tril(lower.astype(INVERSE_DTYPE))
    out = low + low.T
    out.flat[:: out.shape[0] + 1] /= 2
    return np.ascontiguousarray(out)


def _low_rank(name: str, G: np.ndarray, mode: str, value: float,
              placements: dict | None = None) -> LowRank:
    """The Woodbury form of (GᵀG/n + λI)^{-1} for rows G [n, k] (float64 internally). The
    nonzero eigenvalues of GᵀG/n are those of the n × n GGᵀ/n (the rest are 0): for damping
    'auto' and the placement."""
    n, k = G.shape
    G = np.asarray(G, dtype=np.float64)
    spectrum = {}

    def eigenvalues():
        if "e" not in spectrum:
            e = _eigenvalues(G @ G.T) / n
            spectrum["e"] = np.concatenate([e, np.zeros(max(k - n, 0))])
        return spectrum["e"]
    lam = layer_damping(mode, value, float(np.einsum("ij,ij->", G, G)), n * k, eigenvalues)
    if not lam > 0:
        raise _singular(name, lam)
    if placements is not None:
        placements[name] = placement(eigenvalues(), lam)
    return LowRank.fit(name, G, lam)


class Preconditioner:
    """One form per layer (``forms``: Dense, LowRank, Ekfac or Zero, see forms.py) applied to
    [B, K] sketches block by block; ``None`` for identity.

    A layer whose Fisher is exactly zero (no training example's gradient reaches it) is
    ``dropped`` (form Zero): it adds nothing to any score, instead of failing the whole build
    after pass 1. ``efim_layers`` ({layer: why}) are the layers an EK-FAC preconditioner fitted
    with eFIM because they have no Kronecker factors. ``rows`` returns the [n, K] sketches
    the preconditioner was fitted on (read once, on first need): the low-rank layers apply
    through them. ``blocks`` streams the same rows block by block (forms.Blocks): a batch of
    at most ``STREAM_ROWS`` vectors (a query's) is then applied in two passes over them
    instead of reading all n×K into memory; larger batches read and keep them."""

    def __init__(self, layout: dict[str, int], hessian: str, forms: dict | None,
                 damping_used: dict[str, float], damping: tuple[str, float] | None,
                 dropped: list[str] | None = None, efim_layers: dict[str, str] | None = None,
                 rows: Callable[[], np.ndarray] | None = None, blocks: Blocks | None = None):
        self.layout = {str(k): int(v) for k, v in layout.items()}
        self._slices = layer_slices(self.layout)
        self.dim = sum(self.layout.values())
        self.hessian, self.forms = hessian, forms
        self.damping_used, self.damping = damping_used, damping
        self.dropped = list(dropped or [])
        self.efim_layers = dict(efim_layers or {})
        self._rows_source, self._rows, self._blocks = rows, None, blocks
        # {layer: where its λ sits in its spectrum (damping.placement)}: known after a fit
        self.placement: dict[str, dict] = {}

    def rows(self) -> np.ndarray:
        """The [n, K] float32 sketches the low-rank layers were fitted on (read once)."""
        if self._rows is None:
            if self._rows_source is None:
                raise PreconditionError("this preconditioner has low-rank layers but no access "
                                        "to the stored sketches they apply through")
            self._rows = as_float32(self._rows_source(), self.dim, "stored rows")
        return self._rows

    @classmethod
    def fit(cls, fisher: dict[str, np.ndarray], layout: dict[str, int], *, hessian: str = "eFIM",
            damping=DEFAULT_DAMPING) -> "Preconditioner":
        """eFIM: one Cholesky per layer, λ_l from ``damping`` (parse_damping: "auto", a
        relative factor, "abs:λ"; None = 0.3 × mean eigenvalue, what older indexes record).
        identity: no preconditioning and no damping."""
        hessian = _check_hessian(hessian)
        if hessian == "identity":
            return cls(layout, hessian, None, {name: 0.0 for name in layout}, None)
        if hessian == "ekfac":
            raise PreconditionError("an EK-FAC preconditioner is fitted from Kronecker factors "
                                    "and the stored sketches: use Preconditioner.fit_ekfac")
        parse_damping(damping)
        missing = [name for name in layout if name not in fisher]
        if missing:
            raise PreconditionError(f"no Fisher matrix for layer(s) {missing}; accumulate every layer "
                             "of the layout")
        return cls.fit_layers(layout, damping=damping, n=0,
                              take_fisher=lambda name: np.array(fisher[name], dtype=np.float64))

    @classmethod
    def fit_layers(cls, layout: dict[str, int], *, damping=DEFAULT_DAMPING, n: int,
                   take_fisher: Callable[[str], np.ndarray] | None = None,
                   rows: Callable[[], np.ndarray] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> "Preconditioner":
        """eFIM, one layer at a time: a layer with n < k (``uses_low_rank``) in the low-rank
        form from ``rows()`` (the [n, K] float32 sketches, read once), the others densely from
        ``take_fisher(name)`` — the float64 F_l = Σ ĝĝᵀ / n, handed over so it is factored in
        place. ``damping`` as an index records it: "auto" (the default), a relative factor or
        "abs:λ", or None — 0.3 × mean eigenvalue, what an index built before "auto" records —
        so a refit with the recorded value reproduces the index's preconditioner (the one
        place every fit from Fisher sums goes through: build, merge, torchrun, refit)."""
        mode, value = parse_damping(damping)
        layout = {str(k): int(v) for k, v in layout.items()}
        slices = layer_slices(layout)
        pre = cls(layout, "eFIM", {}, {}, (mode, value), [], rows=rows)
        for i, (name, k) in enumerate(layout.items()):
            if rows is not None and uses_low_rank(n, k):
                part = pre.rows()[:, slices[name]]
                form = _low_rank(name, part, mode, value, pre.placement) if part.any() \
                    else Zero()
            else:
                form = _dense(name, _fisher_of(name, k, take_fisher), mode, value, pre.placement)
            pre.forms[name] = form
            pre.damping_used[name] = form.lam
            if isinstance(form, Zero):  # every gradient of this layer is zero
                pre.dropped.append(name)
            if progress is not None:
                progress(i + 1, len(layout))
        return pre

    @classmethod
    def fit_ekfac(cls, layout: dict[str, int], bases: dict, eigenvalues: dict, *,
                  damping=DEFAULT_DAMPING,
                  efim: "Preconditioner | None" = None,
                  efim_layers: dict[str, str] | None = None,
                  rows: Callable[[], np.ndarray] | None = None) -> "Preconditioner":
        """EK-FAC for the layers of ``bases`` ({name: (Q_G, Q_A)}) with corrected eigenvalues
        ``eigenvalues`` ({name: Λ [k]}), kept in the Kronecker eigenbasis; the other layers'
        forms come from ``efim`` (an eFIM preconditioner over them, the reason per layer in
        ``efim_layers``). ``rows``: the [n, K] stored sketches (for low-rank eFIM layers)."""
        mode, value = parse_damping(damping)
        layout = {str(k): int(v) for k, v in layout.items()}
        pre = cls(layout, "ekfac", {}, {}, (mode, value), [],
                  {n: w for n, w in (efim_layers or {}).items() if n in layout}, rows=rows)
        for name, k in layout.items():
            if name in bases:
                qg, qa = bases[name]
                lam_diag = np.asarray(eigenvalues[name], dtype=np.float64)
                if qg.shape[0] * qa.shape[0] != k or lam_diag.shape != (k,):
                    raise PreconditionError(
                        f"layer {name!r}: Kronecker factors {qg.shape[0]} x {qa.shape[0]} do not "
                        f"match its sketch width {k}; rebuild the index")
                form = (Ekfac(qg, qa, lam_diag, ekfac_damping(lam_diag, mode, value))
                        if lam_diag.any() else Zero())
                if lam_diag.any():
                    pre.placement[name] = placement(lam_diag, form.lam)
            else:
                if efim is None or name not in efim.layout:
                    raise PreconditionError(f"no Kronecker factors and no eFIM fit for layer "
                                            f"{name!r}")
                form = efim.forms[name]
                if name in efim.placement:
                    pre.placement[name] = efim.placement[name]
            pre.forms[name] = form
            pre.damping_used[name] = form.lam
            if isinstance(form, Zero):
                pre.dropped.append(name)
        return pre

    def _streamed(self, names, batch: int) -> dict:
        """{name: (form, slice)} of the low-rank layers among ``names`` that a batch of this
        size applies streamed (rows not read yet, a stream given, a small batch)."""
        if self._rows is not None or self._blocks is None or batch > STREAM_ROWS:
            return {}
        return {n: (self.forms[n], self._slices[n]) for n in names
                if isinstance(self.forms[n], LowRank)}

    def apply_layer(self, name: str, vectors) -> np.ndarray:
        """[B, k_l] -> float32 [B, k_l]: (F_l + λ_l I)^{-1} of each vector, in the layer's form."""
        a = np.asarray(vectors, dtype=np.float32)
        if self.forms is None:
            return a.copy()
        sl = self._slices[name]
        streamed = self._streamed([name], len(a))
        if streamed:  # the stream yields whole rows [b, K]: place the layer's columns
            full = np.zeros((len(a), self.dim), np.float32)
            full[:, sl] = a
            return apply_low_rank_streamed(streamed, full, self._blocks)[name]
        return self.forms[name].apply(a, lambda: self.rows()[:, sl])

    def apply(self, g) -> np.ndarray:
        """[B, K] -> float32 [B, K], each layer's block through ``apply_layer`` (the low-rank
        layers of a small batch together, in two passes over the streamed rows)."""
        a = as_float32(g, self.dim)
        if self.forms is None:
            return a.copy()
        out = np.empty_like(a)
        streamed = self._streamed(self._slices, len(a))
        if streamed:
            for name, part in apply_low_rank_streamed(streamed, a, self._blocks).items():
                out[:, self._slices[name]] = part
        for name, sl in self._slices.items():
            if name not in streamed:
                out[:, sl] = self.apply_layer(name, a[:, sl])
        return out

    def dense(self, name: str) -> np.ndarray:
        """Layer ``name``'s (F + λI)^{-1} as a k×k float64 matrix (for tests and comparisons:
        the index itself never forms it unless the layer's form is dense)."""
        k = self.layout[name]
        return np.asarray(self.apply_layer(name, np.eye(k, dtype=np.float32)), dtype=np.float64)

    def describe(self) -> dict:
        return {"hessian": self.hessian,
                "damping": None if self.damping is None else format_damping(*self.damping),
                "damping_used": dict(self.damping_used), "layout": dict(self.layout),
                "dropped": {name: "zero gradient for every training example; contributes "
                                  "nothing to scores" for name in self.dropped},
                **({"forms": {n: f.kind for n, f in self.forms.items()}} if self.forms else {}),
                **({"efim_layers": dict(self.efim_layers)} if self.efim_layers else {}),
                **({"placement": dict(self.placement)} if self.placement else {})}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The small state (names, damping, each layer's form) and, under ``ARRAY/LAYER``, the
        arrays each layer's form keeps (``forms.ARRAY_NAMES``)."""
        d = {"hessian": np.array(self.hessian)}
        if self.damping is not None:
            d["damping_mode"] = np.array(self.damping[0])
            d["damping_value"] = np.array(self.damping[1], dtype=np.float64)
        if self.dropped:
            d["dropped"] = np.array(self.dropped)
        if self.efim_layers:
            d["efim_layers"] = np.array([f"{k}\t{v}" for k, v in self.efim_layers.items()])
        if self.placement:
            d["placement"] = np.array(json.dumps(self.placement, sort_keys=True))
        for name in self.layout:
            d[f"damping_used/{name}"] = np.array(self.damping_used[name], dtype=np.float64)
            if self.forms is not None:
                form = self.forms[name]
                d[f"form/{name}"] = np.array(form.kind)
                d.update({f"{a}/{name}": v for a, v in form.arrays().items()})
        return d

    @classmethod
    def from_state_dict(cls, d: dict, layout: dict[str, int],
                        rows: Callable[[], np.ndarray] | None = None,
                        blocks: Blocks | None = None) -> "Preconditioner":
        """The inverse of ``state_dict``; a state without ``form/LAYER`` entries (written before
        the forms) holds a dense ``inverse/LAYER`` for every layer."""
        try:
            hessian = _check_hessian(str(np.asarray(d["hessian"])))
            used = {name: float(np.asarray(d[f"damping_used/{name}"])) for name in layout}
            damping, forms = None, None
            if hessian != "identity":
                damping = (str(np.asarray(d["damping_mode"])), float(np.asarray(d["damping_value"])))
                forms = {name: _form_of(d, name, int(k), used[name])
                         for name, k in layout.items()}
        except KeyError as e:
            raise PreconditionError(f"preconditioner state lacks {e.args[0]!r}: it is truncated or was "
                             f"saved for another layout than {list(layout)}") from None
        dropped = [str(x) for x in np.asarray(d["dropped"]).reshape(-1)] if "dropped" in d else []
        efim_layers = {}
        if "efim_layers" in d:
            efim_layers = dict(str(x).split("\t", 1)
                               for x in np.asarray(d["efim_layers"]).reshape(-1))
        pre = cls(layout, hessian, forms, used, damping, dropped, efim_layers, rows=rows,
                  blocks=blocks)
        if "placement" in d:
            pre.placement = json.loads(str(np.asarray(d["placement"])))
        return pre


def _form_of(d: dict, name: str, k: int, lam: float):
    """Layer ``name``'s form from a state dict (KeyError when an array is missing)."""
    kind = str(np.asarray(d[f"form/{name}"])) if f"form/{name}" in d else "dense"
    arrays = {a: d[f"{a}/{name}"] for a in ARRAY_NAMES if f"{a}/{name}" in d}
    try:
        return form_from_arrays(kind, arrays, k, lam)
    except KeyError as e:
        raise KeyError(f"{e.args[0]}/{name}") from None
    except PreconditionError as e:
        raise PreconditionError(f"preconditioner state for {name!r}: {e}") from None


def _fisher_of(name: str, k: int, take_fisher) -> np.ndarray:
    """Layer ``name``'s float64 F_l, checked and ready to be factored in place."""
    if take_fisher is None:
        raise PreconditionError(f"no Fisher matrix for layer(s) {[name]}; accumulate every "
                                "layer of the layout")
    try:
        A = take_fisher(name)
    except KeyError:
        raise PreconditionError(f"no Fisher matrix for layer(s) {[name]}; accumulate every "
                                "layer of the layout") from None
    if A.shape != (k, k):
        raise PreconditionError(f"Fisher of layer {name!r} has shape {A.shape}, expected "
                                f"{(k, k)}")
    if A.dtype != np.float64 or not A.flags.c_contiguous or not A.flags.writeable:
        A = np.array(A, dtype=np.float64, order="C")
    if not np.isfinite(A).all():
        raise PreconditionError(f"Fisher of layer {name!r} has NaN/inf entries")
    return A


def _dense(name: str, A: np.ndarray, mode: str, value: float, placements: dict | None = None):
    """The dense form of (A + λI)^{-1}, factoring A in place (Zero when A is zero)."""
    if not A.any():  # every gradient of this layer is zero: nothing to precondition
        return Zero()
    return Dense(*_inverse_in_place(name, A, mode, value, placements))
