"""Per-layer preconditioner in sketch space: eFIM (F_l + λ_l I)^{-1} or identity.

Index vectors are the concatenation of (F_l + λ_l I)^{-1} ĝ_l; queries stay raw, so the inner
product is score(z, z_i) = ĝ(z)ᵀ (F + λI)^{-1} ĝ(z_i) (positive = proponent).
"""
from __future__ import annotations


import numpy as np
import torch

from .damping import format_damping, parse_damping
from .fisher import as_float64, layer_slices
from .errors import PreconditionError

HESSIANS = ("eFIM", "identity")
# A preconditioned vector whose largest |entry| is below this (while its sketch is not zero)
# has lost its precision to float32 underflow: its scores would be 0.0 and its ranking arbitrary.
UNDERFLOW = 1e-30


def unrepresentable_rows(raw, vec) -> tuple[np.ndarray, np.ndarray]:
    """Row positions whose preconditioned vector underflowed (non-zero sketch, vector below
    UNDERFLOW) and whose vector overflowed (inf/NaN)."""
    raw_max = np.abs(np.asarray(raw)).max(axis=1) if len(raw) else np.zeros(0)
    vec = np.asarray(vec)
    finite = np.isfinite(vec).all(axis=1)
    vec_max = np.where(finite, np.abs(np.where(np.isfinite(vec), vec, 0)).max(axis=1), 0) \
        if len(vec) else np.zeros(0)
    return np.flatnonzero((raw_max > 0) & finite & (vec_max < UNDERFLOW)), np.flatnonzero(~finite)


def canonical_hessian(hessian: str) -> str:
    """The canonical spelling of a Hessian name ('efim' -> 'eFIM'); the one home of the names."""
    for h in HESSIANS:
        if isinstance(hessian, str) and hessian.lower() == h.lower():
            return h
    raise PreconditionError(f"unknown hessian {hessian!r}; choose one of {', '.join(HESSIANS)}")


_check_hessian = canonical_hessian  # the name used inside this module


def _damped_inverse(name: str, F: np.ndarray, mode: str, value: float) -> tuple[np.ndarray, float]:
    """(F + λI)^{-1} via Cholesky (LAPACK potrf/potri). The mean eigenvalue is trace(F)/k, so no
    eigendecomposition is needed: measured 5.5 s vs 31.6 s for eigh at k=4096 on 2 cores."""
    k = F.shape[0]
    lam = value * float(np.trace(F)) / k if mode == "relative" else value
    A = torch.from_numpy((F + F.T) / 2)
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise PreconditionError(
            f"layer {name!r}: F + λI is singular or not positive definite (λ = {lam:g}): its "
            "sketches span fewer dimensions than its width k. Use a positive relative damping "
            "(e.g. 0.1, scaled per layer), or leave this layer out with --layers "
            f"'!{name}.*' (or a smaller projection for it)")
    return torch.cholesky_inverse(L).numpy(), float(lam)


class Preconditioner:
    """Holds one symmetric inverse per layer (float64) and applies it to [B, K] sketches.

    A layer whose Fisher is exactly zero (no training example's gradient reaches it) is
    ``dropped``: its inverse is zero, so it adds nothing to any score, instead of failing the
    whole build after pass 1."""

    def __init__(self, layout: dict[str, int], hessian: str, inverses: dict[str, np.ndarray] | None,
                 damping_used: dict[str, float], damping: tuple[str, float] | None,
                 dropped: list[str] | None = None):
        self.layout = {str(k): int(v) for k, v in layout.items()}
        self._slices = layer_slices(self.layout)
        self.dim = sum(self.layout.values())
        self.hessian, self.inverses = hessian, inverses
        self.damping_used, self.damping = damping_used, damping
        self.dropped = list(dropped or [])

    @classmethod
    def fit(cls, fisher: dict[str, np.ndarray], layout: dict[str, int], *, hessian: str = "eFIM",
            damping=None) -> "Preconditioner":
        """eFIM: one Cholesky per layer, λ_l = factor × mean eigenvalue (relative) or λ (absolute).
        identity: no preconditioning and no damping."""
        hessian = _check_hessian(hessian)
        if hessian == "identity":
            return cls(layout, hessian, None, {name: 0.0 for name in layout}, None)
        mode, value = parse_damping(damping)
        missing = [name for name in layout if name not in fisher]
        if missing:
            raise PreconditionError(f"no Fisher matrix for layer(s) {missing}; accumulate every layer "
                             "of the layout")
        inverses, used, dropped = {}, {}, []
        for name, k in layout.items():
            F = np.asarray(fisher[name], dtype=np.float64)
            if F.shape != (k, k):
                raise PreconditionError(f"Fisher of layer {name!r} has shape {F.shape}, expected {(k, k)}")
            if not np.isfinite(F).all():
                raise PreconditionError(f"Fisher of layer {name!r} has NaN/inf entries")
            if not F.any():  # every gradient of this layer is zero: nothing to precondition
                inverses[name], used[name] = np.zeros((k, k)), 0.0
                dropped.append(name)
                continue
            inverses[name], lam = _damped_inverse(name, F, mode, value)
            used[name] = float(lam)
        return cls(layout, hessian, inverses, used, (mode, value), dropped)

    def apply(self, g) -> np.ndarray:
        """[B, K] -> float32 [B, K], each layer's block multiplied by its inverse."""
        a = as_float64(g, self.dim)
        if self.inverses is None:
            return a.astype(np.float32)
        out = np.empty_like(a)
        for name, sl in self._slices.items():
            out[:, sl] = a[:, sl] @ self.inverses[name]  # inverse is symmetric
        return out.astype(np.float32)

    def describe(self) -> dict:
        return {"hessian": self.hessian,
                "damping": None if self.damping is None else format_damping(*self.damping),
                "damping_used": dict(self.damping_used), "layout": dict(self.layout),
                "dropped": {name: "zero gradient for every training example; contributes "
                                  "nothing to scores" for name in self.dropped}}

    def state_dict(self) -> dict[str, np.ndarray]:
        d = {"hessian": np.array(self.hessian)}
        if self.damping is not None:
            d["damping_mode"] = np.array(self.damping[0])
            d["damping_value"] = np.array(self.damping[1], dtype=np.float64)
        if self.dropped:
            d["dropped"] = np.array(self.dropped)
        for name in self.layout:
            d[f"damping_used/{name}"] = np.array(self.damping_used[name], dtype=np.float64)
            if self.inverses is not None:
                d[f"inverse/{name}"] = self.inverses[name].copy()
        return d

    @classmethod
    def from_state_dict(cls, d: dict, layout: dict[str, int]) -> "Preconditioner":
        try:
            hessian = _check_hessian(str(np.asarray(d["hessian"])))
            used = {name: float(np.asarray(d[f"damping_used/{name}"])) for name in layout}
            damping = None
            inverses = None
            if hessian == "eFIM":
                damping = (str(np.asarray(d["damping_mode"])), float(np.asarray(d["damping_value"])))
                inverses = {name: np.asarray(d[f"inverse/{name}"], dtype=np.float64)
                            for name in layout}
        except KeyError as e:
            raise PreconditionError(f"preconditioner state lacks {e.args[0]!r}: it is truncated or was "
                             f"saved for another layout than {list(layout)}") from None
        for name, k in layout.items():
            if inverses is not None and inverses[name].shape != (int(k), int(k)):
                raise PreconditionError(f"preconditioner state for {name!r} has shape "
                                 f"{inverses[name].shape}, but the layout says k={k}")
        dropped = [str(x) for x in np.asarray(d["dropped"]).reshape(-1)] if "dropped" in d else []
        return cls(layout, hessian, inverses, used, damping, dropped)
