"""Compressors for a flat per-sample gradient g [B, d] (GraSS: sparsify, then project)."""
from __future__ import annotations


import torch
from torch import nn

from .base import Transform
from .errors import CompressError


def check_rows(what: str, g: torch.Tensor, d: int) -> None:
    if g.dim() != 2 or g.shape[-1] != d:
        raise CompressError(f"{what}: expected a [batch, {d}] gradient, got shape {tuple(g.shape)}; flatten "
                         "each per-sample gradient row-major (like W.grad.flatten()).")


class FlatCompressor(nn.Module):
    """forward(g: [B, d]) -> [B, k] float32 = project(sparsify(g)); linear in g."""

    def __init__(self, sparsify: Transform, project: Transform, notes: list[str]):
        super().__init__()
        self.sparsify, self.project = sparsify, project
        self.d, self.k = sparsify.d, project.k
        self.notes = list(notes)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        check_rows(type(self).__name__, g, self.d)
        return self.project(self.sparsify(g))

    def describe(self) -> dict:
        """JSON-able record of what actually runs (after clamping)."""
        return {"sparsification": self.sparsify.spec, "projection": self.project.spec,
                "k": self.k, "clamped": list(self.notes)}
