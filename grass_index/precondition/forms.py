"""The form each layer's damped inverse (F_l + λI)⁻¹ is kept in: whichever is exact and smallest.

- ``LowRank`` (n < k rows G [n, k], F = GᵀG/n): Woodbury, (F + λI)⁻¹g = (g − Gᵀ C G g)/λ with
  the n×n core C = (GGᵀ + nλI)⁻¹. It keeps only C; G are the stored sketches themselves, handed
  to ``apply`` (so the index never holds a k×k matrix, nor a second copy of the sketches).
- ``Ekfac``: the Kronecker eigenbasis Q = Q_G ⊗ Q_A and the corrected eigenvalues Λ (see
  ekfac.py): rotate the k_out×k_in sketch by Q_G and Q_A, divide by Λ + λ, rotate back —
  O(k·(k_out + k_in)) per vector instead of k².
- ``Dense``: the float32 k×k inverse, only where the Fisher is full rank (n ≥ k).
- ``Zero``: a layer no training gradient reaches (it adds nothing to any score).

Every form applies in float64 where it rotates or cancels (low-rank, EK-FAC) and returns
float32, so the scores agree with a float64 dense inverse to float32 rounding
(tests/test_precondition.py, tests/test_ekfac.py). ``arrays()`` is what a store keeps per layer.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ..errors import repair_command
from .errors import DampingError, PreconditionError

INVERSE_DTYPE = np.float32
Rows = Callable[[], np.ndarray]  # the layer's stored sketches [n, k] (read on first need)
# the stored sketches streamed: (start id, rows [b, K]) in id order, a fresh pass per call
Blocks = Callable[[], Iterable[tuple[int, np.ndarray]]]


class Dense:
    """A full-rank layer's (F + λI)⁻¹ as a float32 k×k matrix (symmetric)."""

    kind, names = "dense", ("inverse",)

    def __init__(self, inverse: np.ndarray, lam: float = 0.0):
        self.inverse, self.lam = inverse, float(lam)

    def apply(self, a: np.ndarray, rows: Rows) -> np.ndarray:
        return a @ self.inverse  # float32 GEMM; the inverse is symmetric

    def arrays(self) -> dict[str, np.ndarray]:
        return {"inverse": self.inverse}

    @classmethod
    def from_arrays(cls, d: dict, k: int, lam: float) -> "Dense":
        return cls(_shaped(d, "inverse", (k, k)), lam)


class LowRank:
    """(GᵀG/n + λI)⁻¹ for the n < k rows G, kept as the n×n core (GGᵀ + nλI)⁻¹ and λ."""

    kind, names = "low_rank", ("core",)

    def __init__(self, core: np.ndarray, lam: float):
        self.core, self.lam = core, float(lam)

    @classmethod
    def fit(cls, name: str, G: np.ndarray, lam: float) -> "LowRank":
        G = np.asarray(G, dtype=np.float64)
        n = G.shape[0]
        M = G @ G.T
        M.flat[:: n + 1] += n * lam
        try:
            import scipy.linalg

            core = scipy.linalg.cho_solve(scipy.linalg.cho_factor(M, lower=True), np.eye(n))
        except np.linalg.LinAlgError:
            raise singular(name, lam) from None
        return cls((core + core.T) / 2, lam)

    def apply(self, a: np.ndarray, rows: Rows) -> np.ndarray:
        G = np.asarray(rows(), dtype=np.float64)
        self.check_rows(G.shape[0])
        a64 = np.asarray(a, dtype=np.float64)
        out = a64 - ((a64 @ G.T) @ self.core) @ G
        out /= self.lam
        return out.astype(INVERSE_DTYPE)

    def check_rows(self, n: int) -> None:
        if n != self.core.shape[0]:
            raise PreconditionError(
                f"the low-rank preconditioner was fitted on {self.core.shape[0]} rows but the "
                f"store holds {n}; re-precondition the index ({repair_command()})")

    def arrays(self) -> dict[str, np.ndarray]:
        return {"core": self.core}

    @classmethod
    def from_arrays(cls, d: dict, k: int, lam: float) -> "LowRank":
        core = np.asarray(d["core"], dtype=np.float64)
        if core.ndim != 2 or core.shape[0] != core.shape[1] or core.shape[0] >= k:
            raise PreconditionError(f"low-rank core has shape {core.shape}; expected n×n with "
                                    f"n < k = {k}")
        return cls(core, lam)


def apply_low_rank_streamed(layers: dict, a: np.ndarray, blocks: Blocks) -> dict:
    """``LowRank.apply`` of every layer in ``layers`` ({name: (LowRank, column slice)}) to the
    batch ``a`` [B, K], reading the stored rows G as ``blocks()`` streams them, twice (S = a Gᵀ,
    then (a − S C G)/λ), instead of holding all n×K: memory B·n per layer plus a block."""
    a64 = {name: np.array(a[:, sl], dtype=np.float64) for name, (_, sl) in layers.items()}
    n = max(f.core.shape[0] for f, _ in layers.values())
    S = {name: np.zeros((len(a), n)) for name in layers}
    seen, in_order = 0, True
    for start, R in blocks():
        in_order = in_order and start == seen
        if in_order and seen + len(R) <= n:
            for name, (_, sl) in layers.items():
                S[name][:, start:start + len(R)] = a64[name] @ R[:, sl].T
        seen += len(R)
    if not in_order:
        raise PreconditionError("the stored rows are not in id order; the store is damaged "
                                f"({repair_command()})")
    for f, _ in layers.values():
        f.check_rows(seen)
    T = {name: S.pop(name) @ f.core for name, (f, _) in layers.items()}
    for start, R in blocks():
        for name, (_, sl) in layers.items():
            a64[name] -= T[name][:, start:start + len(R)] @ R[:, sl]
    return {name: (a64[name] / f.lam).astype(INVERSE_DTYPE)
            for name, (f, _) in layers.items()}


class Ekfac:
    """Q diag(Λ + λ)⁻¹ Qᵀ with Q = Q_G ⊗ Q_A, applied by rotation (never formed)."""

    kind, names = "ekfac", ("qg", "qa", "eig")

    def __init__(self, qg: np.ndarray, qa: np.ndarray, eig: np.ndarray, lam: float):
        self.qg, self.qa = np.asarray(qg, np.float64), np.asarray(qa, np.float64)
        self.eig, self.lam = np.asarray(eig, np.float64), float(lam)

    def apply(self, a: np.ndarray, rows: Rows) -> np.ndarray:
        ko, ki = self.qg.shape[0], self.qa.shape[0]
        M = np.asarray(a, dtype=np.float64).reshape(len(a), ko, ki)
        R = np.matmul(np.matmul(self.qg.T, M), self.qa)  # vec(Q_Gᵀ M Q_A) = Qᵀ vec(M)
        R /= (self.eig + self.lam).reshape(ko, ki)
        out = np.matmul(np.matmul(self.qg, R), self.qa.T)  # Q vec(R)
        return out.reshape(len(a), -1).astype(INVERSE_DTYPE)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"qg": self.qg, "qa": self.qa, "eig": self.eig}

    @classmethod
    def from_arrays(cls, d: dict, k: int, lam: float) -> "Ekfac":
        qg, qa, eig = (np.asarray(d[x], dtype=np.float64) for x in ("qg", "qa", "eig"))
        if qg.shape[0] * qa.shape[0] != k or eig.shape != (k,):
            raise PreconditionError(f"EK-FAC factors {qg.shape} x {qa.shape} (eigenvalues "
                                    f"{eig.shape}) do not match the layer width {k}")
        return cls(qg, qa, eig, lam)


class Zero:
    """A layer whose gradient is zero for every training example: it scores nothing."""

    kind, names, lam = "zero", (), 0.0

    def apply(self, a: np.ndarray, rows: Rows) -> np.ndarray:
        return np.zeros(a.shape, INVERSE_DTYPE)

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_arrays(cls, d: dict, k: int, lam: float = 0.0) -> "Zero":
        return cls()


FORMS = {f.kind: f for f in (Dense, LowRank, Ekfac, Zero)}
ARRAY_NAMES = ("inverse", "core", "qg", "qa", "eig")  # every per-layer array a form keeps


def form_from_arrays(kind: str, d: dict, k: int, lam: float):
    """A layer's form from its stored arrays ``d`` ({array name: array})."""
    if kind not in FORMS:
        raise PreconditionError(f"unknown preconditioner form {kind!r}; this index was "
                                "written by a newer grass-index")
    return FORMS[kind].from_arrays(d, k, lam)


def _shaped(d: dict, key: str, shape: tuple) -> np.ndarray:
    a = d[key]
    if tuple(a.shape) != shape:
        raise PreconditionError(f"preconditioner array {key!r} has shape {tuple(a.shape)}, "
                                f"expected {shape}")
    return a if a.dtype == INVERSE_DTYPE else np.asarray(a, dtype=INVERSE_DTYPE)


def singular(name: str, lam: float) -> DampingError:
    """F + λI not positive definite: a damping too small for this layer (pass 2 adds the exact
    command that re-runs it with a larger one)."""
    from ..errors import option

    return DampingError(
        f"layer {name!r}: F + λI is singular or not positive definite (λ = {lam:g}): its "
        "sketches span fewer dimensions than its width k, and this damping is too small to "
        "make up for it. Use a larger damping (relative, e.g. 0.1, scales per layer), or leave "
        f"this layer out with {option('layers', f'!{name}.*')} (or a smaller projection for "
        "it)", needs="larger")
