"""Sparsification by a coordinate gather (ops.mask): O(k') work, independent of d."""
from __future__ import annotations

import math

import torch

from .. import ops
from .base import Transform


class RandomMask(Transform):
    """Keep k' coordinates drawn uniformly without replacement, scaled by sqrt(d/k') so that
    E[<Mx, My>] = <x, y> (each coordinate survives with probability k'/d)."""

    def __init__(self, d: int, k: int, gen: torch.Generator):
        super().__init__(d, k, f"random_mask-{k}")
        idx = torch.randperm(d, generator=gen)[:k].sort().values  # sorted: friendlier memory access
        self.register_buffer("idx", idx.to(torch.int64))
        self.scale = math.sqrt(d / k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.mask(x.contiguous(), self.idx).float()
        return out * self.scale if self.k != self.d else out


class SelectiveMask(Transform):
    """Keep learned coordinates, with no rescaling: the indices are chosen (by a trained mask)
    to hold most of the gradient's energy, so they are not a uniform sample and the sqrt(d/k')
    unbiasing factor would overstate the kept part. A constant factor also cannot change which
    training examples rank highest, so leaving it out loses nothing."""

    def __init__(self, d: int, idx: torch.Tensor):
        super().__init__(d, int(idx.numel()), f"selective_mask-{int(idx.numel())}")
        self.register_buffer("idx", idx.to(torch.int64).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.mask(x.contiguous(), self.idx).float()
