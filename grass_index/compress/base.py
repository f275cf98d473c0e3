"""The interface every transform shares: a buffer-only nn.Module mapping [..., d] -> [..., k].

Outputs are float32 whatever the input dtype (float16/bfloat16 gradients are upcast once,
after any cheap gather), so sums over tokens and samples keep precision.
"""
from __future__ import annotations

import torch
from torch import nn


class Transform(nn.Module):
    """Base: ``d`` input dim, ``k`` output dim, ``spec`` the effective spec string."""

    def __init__(self, d: int, k: int, spec: str):
        super().__init__()
        self.d, self.k, self.spec = int(d), int(k), spec

    def extra_repr(self) -> str:
        return f"{self.spec!r}, d={self.d}, k={self.k}"

    def dense_matrix(self) -> torch.Tensor:
        """The [d, k] matrix M with forward(x) == x @ M (tests and debugging; O(d*k) memory)."""
        device = next(iter(self.buffers()), torch.empty(0)).device
        return self(torch.eye(self.d, device=device))


class Identity(Transform):
    """Exact: no compression (also what a clamped stage becomes)."""

    def __init__(self, d: int):
        super().__init__(d, d, "identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


class Chain(Transform):
    """Two transforms in sequence (the ``grass`` kind: random mask to k', then SJLT to k)."""

    def __init__(self, first: Transform, second: Transform, spec: str):
        super().__init__(first.d, second.k, spec)
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))
