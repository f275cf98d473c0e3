"""Fast JL transform: random signs, a Walsh-Hadamard transform, then a random row subsample.

O(D log D) per row with D = d rounded up to a power of two (zero padding), no d x k matrix.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import ops
from .base import Transform


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dim (a power of two): x @ H, H H^T = D I.

    Butterfly in log2(D) reshapes; shapes are static, so it traces into one graph."""
    D = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < D:
        y = x.reshape(*lead, D // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, D)
        h *= 2
    return x


class FJLT(Transform):
    """y = sqrt(1/k) * sample_k(H diag(sign) pad(x)). Since H^T H = D I and each of the D rows
    is kept with probability k/D, E[|y|^2] = |x|^2 (and likewise inner products)."""

    def __init__(self, d: int, k: int, gen: torch.Generator):
        super().__init__(d, k, f"fjlt-{k}")
        self.padded = 1 << max(0, (d - 1).bit_length())
        sign = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
        self.register_buffer("sign", sign)
        rows = torch.randperm(self.padded, generator=gen)[:k].sort().values
        self.register_buffer("rows", rows.to(torch.int64))
        self.scale = 1.0 / math.sqrt(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * self.sign
        if self.padded != self.d:
            y = F.pad(y, (0, self.padded - self.d))
        return ops.mask(fwht(y).contiguous(), self.rows) * self.scale
