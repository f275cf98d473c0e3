"""Sparse Johnson-Lindenstrauss transform: O(s*d) work, no d x k matrix in memory."""
from __future__ import annotations

import math

import torch

from .. import ops
from .base import Transform


class SJLT(Transform):
    """Each input coordinate j goes to s buckets idx[r, j] (uniform in [0, k)) with random
    signs, scaled by 1/sqrt(s), so every column of the implied matrix has unit norm in
    expectation and E[<Sx, Sy>] = <x, y>. Buckets of different rows are drawn independently
    (a collision just adds two signed terms; the estimate stays unbiased)."""

    def __init__(self, d: int, k: int, gen: torch.Generator, s: int = 1):
        super().__init__(d, k, f"sjlt-{k}" + (f":s={s}" if s != 1 else ""))
        self.s = int(s)
        self.scale = 1.0 / math.sqrt(s)
        self.register_buffer("idx", torch.randint(0, k, (s, d), generator=gen, dtype=torch.int64))
        signs = torch.randint(0, 2, (s, d), generator=gen, dtype=torch.int8) * 2 - 1
        self.register_buffer("sign", signs.to(torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.sjlt(x.float().contiguous(), self.idx, self.sign, self.k)
        return out * self.scale if self.s != 1 else out
