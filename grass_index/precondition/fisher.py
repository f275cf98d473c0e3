"""Empirical Fisher per layer in sketch space, F_l = (1/n) Σ ĝ ĝᵀ; mergeable for sharded builds.

Each chunk of at most ``GEMM_ROWS`` rows is one float32 GEMM (the sketches are float32 anyway;
half the time of float64 and no float64 copy of the rows), added into a float64 running sum, so
millions of rows keep float64's precision across chunks: the relative error stays near float32
rounding of one chunk's sum, bounded in tests/test_fisher_streaming.py over 100k+ rows.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import PreconditionError

GEMM_ROWS = 4096  # rows per float32 GEMM before the float64 add
CHUNK_BYTES = 256 << 20  # ChunkedFisher: rows buffered per GEMM, at most this many bytes


def layer_slices(layout: dict[str, int]) -> dict[str, slice]:
    """Column range of each layer in the concatenated [B, K] sketch."""
    out, start = {}, 0
    for name, k in layout.items():
        if int(k) <= 0:
            raise PreconditionError(f"layer {name!r} has sketch width {k}; widths must be positive")
        out[name] = slice(start, start + int(k))
        start += int(k)
    return out


def as_float32(x, K: int, what: str = "sketches") -> np.ndarray:
    """[B, K] float32 array (no copy when it already is one), clear error for the wrong width."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != K:
        raise PreconditionError(f"{what} must have shape [B, {K}] (the layout's total width); "
                         f"got {a.shape}")
    return a


class FisherAccumulator:
    """Running Σ ĝ_l ĝ_lᵀ and n, per layer of ``layout`` (ordered {name: k_l}).

    ``only`` limits the sums to those layers (the others' columns are skipped): a build keeps
    k×k float64 only for layers whose preconditioner needs the dense Fisher.
    """

    def __init__(self, layout: dict[str, int], only=None):
        self.layout = {str(k): int(v) for k, v in layout.items()}
        self._slices = layer_slices(self.layout)
        self.dim = sum(self.layout.values())
        self.n = 0
        names = list(self.layout) if only is None else [str(x) for x in only]
        unknown = [x for x in names if x not in self.layout]
        if unknown:
            raise PreconditionError(f"no layer(s) {unknown}; layers are {list(self.layout)}")
        self._sums = {name: np.zeros((self.layout[name],) * 2) for name in names}

    @property
    def names(self) -> list[str]:
        """The layers whose sums are kept (all of the layout unless ``only`` was given)."""
        return list(self._sums)

    def update(self, sketches) -> None:
        g = as_float32(sketches, self.dim)
        if not np.isfinite(g).all():
            row = int(np.nonzero(~np.isfinite(g).all(axis=1))[0][0])
            raise PreconditionError(f"non-finite value in sketch row {row}; the Fisher would be poisoned")
        for lo in range(0, g.shape[0], GEMM_ROWS):
            chunk = g[lo: lo + GEMM_ROWS]
            for name, total in self._sums.items():
                part = np.ascontiguousarray(chunk[:, self._slices[name]])
                total += part.T @ part  # float32 GEMM, float64 running sum
        self.n += g.shape[0]

    def take_sum(self, name: str) -> np.ndarray:
        """Hand over layer ``name``'s float64 sum Σ ĝĝᵀ (removed from the accumulator), so the
        caller can factor it in place without a second k×k copy."""
        if name not in self._sums:
            raise KeyError(f"no sums for layer {name!r}; kept: {self.names}")
        return self._sums.pop(name)

    def fisher(self, name: str) -> np.ndarray:
        if name not in self._sums:
            raise KeyError(f"no layer {name!r}; layers are {list(self.layout)}")
        if self.n == 0:
            raise PreconditionError("no sketches accumulated yet; call update() before fisher()")
        return self._sums[name] / self.n

    def fishers(self) -> dict[str, np.ndarray]:
        return {name: self.fisher(name) for name in self._sums}

    def merge(self, other: "FisherAccumulator") -> "FisherAccumulator":
        """Add another shard's sums (same layout) into this one; returns self."""
        if list(other.layout.items()) != list(self.layout.items()) or other.names != self.names:
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
                    for name in self._sums}
        except KeyError as e:
            raise PreconditionError(f"Fisher state lacks {e.args[0]!r}; it was saved for another "
                             f"layout than {list(self.layout)}") from None
        for name, s in sums.items():
            k = self.layout[name]
            if s.shape != (k, k):
                raise PreconditionError(f"Fisher state for {name!r} has shape {s.shape}, expected {(k, k)}")
        self.n, self._sums = n, {name: s.copy() for name, s in sums.items()}


class ChunkedFisher:
    """A FisherAccumulator fed in fixed chunks of global rows [c·R, (c+1)·R), R set by the
    sketch width alone: however the rows arrive (pass 1 batch by batch, a pass 1 resumed after
    a crash and re-read up to where it stopped, a later re-read of the whole store) the float32
    GEMMs see the same chunks, so the sums are bit-identical. Buffers at most ``CHUNK_BYTES``."""

    def __init__(self, layout: dict[str, int], only=None):
        self.acc = FisherAccumulator(layout, only)
        self.chunk_rows = max(1, min(GEMM_ROWS, CHUNK_BYTES // (4 * self.acc.dim)))
        self.next_id = 0
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    def add(self, start_id: int, rows) -> None:
        """Rows with ids start_id.. (they must follow the previous call's)."""
        if int(start_id) != self.next_id:
            raise PreconditionError(f"Fisher rows must arrive in id order: expected id {self.next_id}, "
                             f"got {start_id}")
        rows = as_float32(rows, self.acc.dim)
        self.next_id += len(rows)
        while len(rows):
            take = min(len(rows), self.chunk_rows - self._buffered)
            self._buf.append(rows[:take])
            self._buffered += take
            rows = rows[take:]
            if self._buffered == self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        if self._buf:
            self.acc.update(self._buf[0] if len(self._buf) == 1 else np.concatenate(self._buf))
        self._buf, self._buffered = [], 0

    def finish(self) -> FisherAccumulator:
        """The sums over every row added (the partial last chunk included)."""
        self._flush()
        return self.acc
