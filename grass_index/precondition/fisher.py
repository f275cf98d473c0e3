"""Empirical Fisher per layer in sketch space, F_l = (1/n) Σ ĝ ĝᵀ, accumulated in float64 so
millions of rank-one updates keep precision; mergeable for sharded builds."""
from __future__ import annotations


import numpy as np
import torch

from .errors import PreconditionError


def layer_slices(layout: dict[str, int]) -> dict[str, slice]:
    """Column range of each layer in the concatenated [B, K] sketch."""
    out, start = {}, 0
    for name, k in layout.items():
        if int(k) <= 0:
            raise PreconditionError(f"layer {name!r} has sketch width {k}; widths must be positive")
        out[name] = slice(start, start + int(k))
        start += int(k)
    return out


def as_float64(x, K: int, what: str = "sketches") -> np.ndarray:
    """[B, K] array from a Tensor/ndarray, with a clear error for the wrong width."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != K:
        raise PreconditionError(f"{what} must have shape [B, {K}] (the layout's total width); "
                         f"got {a.shape}")
    return a


class FisherAccumulator:
    """Running Σ ĝ_l ĝ_lᵀ and n, per layer of ``layout`` (ordered {name: k_l})."""

    def __init__(self, layout: dict[str, int]):
        self.layout = {str(k): int(v) for k, v in layout.items()}
        self._slices = layer_slices(self.layout)
        self.dim = sum(self.layout.values())
        self.n = 0
        self._sums = {name: np.zeros((k, k)) for name, k in self.layout.items()}

    def update(self, sketches) -> None:
        g = as_float64(sketches, self.dim)
        if not np.isfinite(g).all():
            row = int(np.nonzero(~np.isfinite(g).all(axis=1))[0][0])
            raise PreconditionError(f"non-finite value in sketch row {row}; the Fisher would be poisoned")
        for name, sl in self._slices.items():
            part = g[:, sl]
            self._sums[name] += part.T @ part
        self.n += g.shape[0]

    def fisher(self, name: str) -> np.ndarray:
        if name not in self._sums:
            raise KeyError(f"no layer {name!r}; layers are {list(self.layout)}")
        if self.n == 0:
            raise PreconditionError("no sketches accumulated yet; call update() before fisher()")
        return self._sums[name] / self.n

    def fishers(self) -> dict[str, np.ndarray]:
        return {name: self.fisher(name) for name in self.layout}

    def merge(self, other: "FisherAccumulator") -> "FisherAccumulator":
        """Add another shard's sums (same layout) into this one; returns self."""
        if list(other.layout.items()) != list(self.layout.items()):
            raise PreconditionError("cannot merge Fisher accumulators with different layouts: "
                             f"{self.layout} vs {other.layout}")
        for name in self._sums:
            self._sums[name] += other._sums[name]
        self.n += other.n
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        d = {"n": np.array(self.n, dtype=np.int64)}
        d.update({f"sum/{name}": s.copy() for name, s in self._sums.items()})
        return d

    def load_state_dict(self, state: dict) -> None:
        try:
            n = int(np.asarray(state["n"]))
            sums = {name: np.asarray(state[f"sum/{name}"], dtype=np.float64)
                    for name in self.layout}
        except KeyError as e:
            raise PreconditionError(f"Fisher state lacks {e.args[0]!r}; it was saved for another "
                             f"layout than {list(self.layout)}") from None
        for name, s in sums.items():
            k = self.layout[name]
            if s.shape != (k, k):
                raise PreconditionError(f"Fisher state for {name!r} has shape {s.shape}, expected {(k, k)}")
        self.n, self._sums = n, {name: s.copy() for name, s in sums.items()}
