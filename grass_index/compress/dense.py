"""Dense random projections (LoGra's choice): O(d*k) work and memory per row."""
from __future__ import annotations

import math

import torch

from .base import Transform


class _Dense(Transform):
    def __init__(self, d: int, k: int, spec: str, matrix: torch.Tensor):
        super().__init__(d, k, spec)
        self.register_buffer("matrix", matrix.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.matrix


class Gaussian(_Dense):
    """Entries N(0, 1/k): E[<Px, Py>] = <x, y>."""

    def __init__(self, d: int, k: int, gen: torch.Generator):
        m = torch.randn(d, k, generator=gen) / math.sqrt(k)
        super().__init__(d, k, f"normal-{k}", m)


class Rademacher(_Dense):
    """Entries +-1/sqrt(k): the same second moments as Gaussian, cheaper to draw."""

    def __init__(self, d: int, k: int, gen: torch.Generator):
        signs = torch.randint(0, 2, (d, k), generator=gen, dtype=torch.int8).float() * 2 - 1
        super().__init__(d, k, f"rademacher-{k}", signs / math.sqrt(k))
