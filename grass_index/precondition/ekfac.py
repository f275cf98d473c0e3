"""EK-FAC for factored sketches with an identity final projection (LoGra-style ``A*B``).

There a layer's sketch is vec(M_i), M_i = Σ_t g'_t x'_tᵀ (k_out × k_in, row-major), where x'_t
and g'_t are the layer's compressed input and output gradient at token t. K-FAC approximates
F_l = E[vec(M) vec(M)ᵀ] by G ⊗ A with A = Σ x'x'ᵀ, G = Σ g'g'ᵀ over tokens; EK-FAC keeps only
the eigenbasis Q = Q_G ⊗ Q_A of that product and re-fits the eigenvalues to the real
per-example gradients:  Λ_ab = mean_i (Q_Gᵀ M_i Q_A)_ab²  (George et al. 2018), so

    (F + λI)^{-1} ≈ Q diag(Λ + λ)^{-1} Qᵀ,   λ = factor × mean(Λ)

(mean(Λ) = trace(F_l)/k, the same scale as eFIM's relative damping), applied by rotating into
the eigenbasis and back (forms.Ekfac: O(k·(k_out + k_in)) per vector; Q is never formed). Only the eigenvectors of
A and G matter — their scale cancels — so the factor sums need no normalisation.

``KroneckerFactors`` accumulates A and G per layer (float64) from the compressors' observer
hook during pass 1; it is saved in the store with the number of blocks it covers, so a
resumed pass 1 continues the same running sums (bit-identical factors).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..compress import parse_spec
from .errors import PreconditionError
from .fisher import layer_slices
from .state import state_from_array, state_to_array

STATE_ARRAY = "kfac/state"  # the store array that holds a KroneckerFactors state (.npz bytes)


# EK-FAC keeps a dense k x k inverse per layer (k = A*B of the factored sparsification): the
# suggested spec caps each factor here, k <= 1024 (4 MB per layer), so that it also fits a
# 48-layer LM; the user's A*B (e.g. the default 128*128, k = 16384: 1 GB per layer) need not.
EKFAC_SUGGESTED_FACTOR = 32


def ekfac_spec_fix(sparsification: str | None = None) -> tuple[str, str]:
    """A (sparsification, projection) pair that EK-FAC fits: ``sparsification``'s kind and
    options with each factor capped at EKFAC_SUGGESTED_FACTOR (random_mask when it is not a
    factorable kind), and projection 'identity'."""
    from ..compress.spec import FACTORABLE

    sp = parse_spec(sparsification) if sparsification else None
    cap = EKFAC_SUGGESTED_FACTOR
    if sp is not None and sp.kind in FACTORABLE and sp.factored:
        return str(dataclasses.replace(sp, dims=tuple(min(d, cap) for d in sp.dims))), "identity"
    return f"random_mask-{cap}*{cap}", "identity"


def ekfac_unsupported(sparsification: str, projection: str) -> str | None:
    """Why a spec pair has no Kronecker-factored sketch (None when it has one), with a pair
    that has one (``ekfac_spec_fix``), spelled for the caller (CLI flags or arguments)."""
    from ..errors import spelled

    sp, pr = parse_spec(sparsification), parse_spec(projection)
    fix_sp, fix_pr = ekfac_spec_fix(sparsification)
    fix = spelled(f"--sparsification {fix_sp} --projection {fix_pr} (or --hessian eFIM)",
                  f"sparsification={fix_sp!r}, projection={fix_pr!r} (or hessian='eFIM')")
    ekfac = spelled("--hessian ekfac", "hessian='ekfac'")
    if not sp.factored:
        return (f"{ekfac} needs a factored sparsification (TYPE-A*B) with projection "
                f"'identity', but the sparsification is '{sp}'; use e.g. {fix}")
    if pr.kind != "identity":
        return (f"{ekfac} needs projection 'identity' after the factored sparsification "
                f"'{sp}' (the sketch must be the k_out x k_in gradient itself, and EK-FAC keeps "
                f"a dense k x k inverse per layer), but the projection is '{pr}'; use {fix}")
    return None


class KroneckerFactors:
    """Per layer the running Σ x'x'ᵀ (k_in × k_in) and Σ g'g'ᵀ (k_out × k_out) over tokens,
    and which layers missed a batch (their factors do not describe every example)."""

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        self.shapes = {str(k): (int(v[0]), int(v[1])) for k, v in shapes.items()}
        self.A = {n: np.zeros((ki, ki)) for n, (ki, _) in self.shapes.items()}
        self.G = {n: np.zeros((ko, ko)) for n, (_, ko) in self.shapes.items()}
        self.tokens = {n: 0 for n in self.shapes}
        self.missing: dict[str, str] = {}
        self.blocks = 0
        self._seen: set[str] = set()

    # -- pass 1 -----------------------------------------------------------------------------
    def observer(self, name: str):
        """The callable a FactoredCompressor calls with (compress_in(x) [B,T,k_in],
        compress_out(Dy) [B,T,k_out]) of every call it sketches."""
        def observe(xs: torch.Tensor, gs: torch.Tensor) -> None:
            x = xs.detach().reshape(-1, xs.shape[-1]).to(torch.float64)
            g = gs.detach().reshape(-1, gs.shape[-1]).to(torch.float64)
            self.A[name] += (x.T @ x).cpu().numpy()
            self.G[name] += (g.T @ g).cpu().numpy()
            self.tokens[name] += int(x.shape[0])
            self._seen.add(name)
        return observe

    def end_batch(self, why_missing: str = "a batch was not seen by the factored capture "
                                           "(captured from torch.func gradients instead)") -> None:
        """Close one batch: a layer that saw none of it is marked missing (for good)."""
        for name in self.shapes:
            if name not in self._seen and name not in self.missing:
                self.missing[name] = why_missing
        self._seen.clear()
        self.blocks += 1

    # -- results ------------------------------------------------------------------------------
    def usable(self) -> list[str]:
        return [n for n in self.shapes if n not in self.missing and self.tokens[n] > 0]

    def eigenbases(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(Q_G [k_out, k_out], Q_A [k_in, k_in]): eigenvectors of the factor sums."""
        A, G = self.A[name], self.G[name]
        _, qa = np.linalg.eigh((A + A.T) / 2)
        _, qg = np.linalg.eigh((G + G.T) / 2)
        return qg, qa

    # -- persistence / merging ----------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        names = list(self.shapes)
        d = {"names": np.array(names), "shapes": np.array([self.shapes[n] for n in names],
                                                          dtype=np.int64).reshape(-1, 2),
             "tokens": np.array([self.tokens[n] for n in names], dtype=np.int64),
             "blocks": np.array(self.blocks, dtype=np.int64),
             "missing": np.array([f"{k}\t{v}" for k, v in self.missing.items()] or [""])}
        for n in names:
            d[f"A/{n}"], d[f"G/{n}"] = self.A[n], self.G[n]
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> "KroneckerFactors":
        try:
            names = [str(x) for x in np.asarray(d["names"]).reshape(-1)]
            shapes = np.asarray(d["shapes"]).reshape(-1, 2)
            out = cls({n: tuple(int(v) for v in s) for n, s in zip(names, shapes)})
            for i, n in enumerate(names):
                out.A[n] = np.array(d[f"A/{n}"], dtype=np.float64)
                out.G[n] = np.array(d[f"G/{n}"], dtype=np.float64)
                out.tokens[n] = int(np.asarray(d["tokens"])[i])
            out.blocks = int(np.asarray(d["blocks"]))
            out.missing = dict(s.split("\t", 1) for s in
                               (str(x) for x in np.asarray(d["missing"]).reshape(-1)) if s)
        except (KeyError, ValueError) as e:
            raise PreconditionError(f"the stored Kronecker factors are damaged ({e}); rebuild "
                                    "the index to recompute them") from None
        return out

    def merge(self, other: "KroneckerFactors") -> "KroneckerFactors":
        """Add another shard's sums (same layers and shapes); returns self."""
        if other.shapes != self.shapes:
            raise PreconditionError("cannot merge Kronecker factors of different layers or "
                                    f"shapes: {self.shapes} vs {other.shapes}")
        for n in self.shapes:
            self.A[n] += other.A[n]
            self.G[n] += other.G[n]
            self.tokens[n] += other.tokens[n]
        for n, why in other.missing.items():
            self.missing.setdefault(n, why)
        self.blocks += other.blocks
        return self


def save_factors(store, factors: KroneckerFactors) -> None:
    store.put_array(STATE_ARRAY, state_to_array(factors.state_dict()))


def load_factors(store) -> KroneckerFactors | None:
    """The factors a store holds, or None when pass 1 accumulated none."""
    if not store.has_array(STATE_ARRAY):
        return None
    return KroneckerFactors.from_state_dict(state_from_array(store.get_array(STATE_ARRAY)))


def rotate(rows: np.ndarray, qg: np.ndarray, qa: np.ndarray) -> np.ndarray:
    """[B, k_out*k_in] row-major gradients -> [B, k_out*k_in] in the Kronecker eigenbasis,
    vec(Q_Gᵀ M Q_A) = (Q_G ⊗ Q_A)ᵀ vec(M)."""
    M = np.asarray(rows, dtype=np.float64).reshape(len(rows), qg.shape[0], qa.shape[0])
    return np.matmul(np.matmul(qg.T, M), qa).reshape(len(rows), -1)


def corrected_eigenvalues(blocks, layout: dict[str, int], bases: dict) -> dict[str, np.ndarray]:
    """Λ per layer in ``bases`` ({name: (Q_G, Q_A)}): the mean over every stored row (``blocks``
    yields (start, [B, K] rows)) of the squared rotated gradient, row-major [k_out*k_in]."""
    slices = layer_slices(layout)
    sums = {n: np.zeros(layout[n]) for n in bases}
    n_rows = 0
    for _, rows in blocks:
        rows = np.asarray(rows, dtype=np.float32)
        for name, (qg, qa) in bases.items():
            r = rotate(rows[:, slices[name]], qg, qa)
            sums[name] += np.einsum("ij,ij->j", r, r)
        n_rows += len(rows)
    if n_rows == 0:
        raise PreconditionError("no stored sketches to fit the EK-FAC eigenvalues from")
    return {n: s / n_rows for n, s in sums.items()}


def ekfac_damping(lam_diag: np.ndarray, mode: str, value: float) -> float:
    """λ for corrected eigenvalues Λ: factor × mean(Λ) (relative) or the absolute value. The
    layer then applies as Q diag(Λ + λ)^{-1} Qᵀ in its eigenbasis (forms.Ekfac), never formed."""
    from .damping import layer_damping

    lam = layer_damping(mode, value, float(lam_diag.mean()), 1, lam_diag)
    if not lam > 0 or not np.isfinite(lam):
        raise PreconditionError(f"EK-FAC damping λ = {lam:g} is not positive; use a positive "
                                "relative damping such as 0.1")
    return lam
