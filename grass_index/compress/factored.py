"""Compressors for a linear layer's per-sample gradient G_b = sum_t grad_out[b,t] x[b,t]^T.

Factored (FactGraSS, LoGra): compress each factor per token, then sum the outer products
with one batched matmul, so the d_out x d_in gradient never exists:
    sketch = project(vec(sum_t C_out(grad_out_t) C_in(x_t)^T)) = project((C_out kron C_in) vec(G)).
Flattening is row-major over [k_out', k_in'], i.e. index a*k_in' + b keeps (out[a], in[b]),
matching W.grad.flatten() when both factors are identity.
"""
from __future__ import annotations


import torch
from torch import nn

from .base import Transform
from .spec import Spec, parse_spec
from .errors import CompressError


def as_tokens(what: str, name: str, t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, d] -> [B, 1, d]; [B, T, d] unchanged; anything else is an error."""
    if t.dim() not in (2, 3) or t.shape[-1] != dim:
        raise CompressError(f"{what}: {name} must be [batch, tokens, {dim}] or [batch, {dim}], got shape "
                         f"{tuple(t.shape)}. If the layer was given a bias column, append ones to x first.")
    return t.unsqueeze(1) if t.dim() == 2 else t


def check_pair(what: str, x: torch.Tensor, grad_out: torch.Tensor, d_in: int, d_out: int):
    x = as_tokens(what, "x", x, d_in)
    g = as_tokens(what, "grad_out", grad_out, d_out)
    if x.shape[:2] != g.shape[:2]:
        raise CompressError(f"{what}: x {tuple(x.shape)} and grad_out {tuple(g.shape)} must agree on batch "
                         "and token dims.")
    return x, g


def merged_spec(a: Transform, b: Transform) -> str:
    """'kind-A*B' when both factors have the same kind, else 'specIn*specOut' (not re-parseable)."""
    sa, sb = parse_spec(a.spec), parse_spec(b.spec)
    if sa.kind == sb.kind and sa.s == sb.s:
        return str(Spec(sa.kind, (a.k, b.k), sa.s))
    return "*".join(s if s != "identity" else f"identity-{t.k}" for s, t in ((a.spec, a), (b.spec, b)))


class FactoredCompressor(nn.Module):
    """forward(x: [B,T,d_in] | [B,d_in], grad_out: [B,T,d_out] | [B,d_out]) -> [B, k] float32."""

    def __init__(self, compress_in: Transform, compress_out: Transform, project: Transform,
                 notes: list[str]):
        super().__init__()
        self.compress_in, self.compress_out, self.project = compress_in, compress_out, project
        self.d_in, self.d_out, self.k = compress_in.d, compress_out.d, project.k
        self.notes = list(notes)
        # observer(xs, gs), when set, sees every call's compressed factors (e.g. to accumulate
        # the Kronecker factors EK-FAC needs); it must not modify them
        self.observer = None

    def forward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        x, g = check_pair(type(self).__name__, x, grad_out, self.d_in, self.d_out)
        return self.from_compressed_input(self.compress_in(x), g)

    def from_compressed_input(self, xs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The sketch given xs = compress_in(x) [B, T, k_in'] already (a caller that can form
        only the kept input coordinates, e.g. a convolution's masked patches, skips the rest)."""
        gs = self.compress_out(g)           # [B, T, k_out']
        if self.observer is not None:
            self.observer(xs, gs)
        outer = torch.bmm(gs.transpose(1, 2), xs)   # [B, k_out', k_in'], summed over tokens
        return self.project(outer.reshape(outer.shape[0], -1))

    def compress_matrix(self, G: torch.Tensor) -> torch.Tensor:
        """The same sketch from a formed gradient G [B, d_out, d_in] (the exact fallback path):
        C_out G C_inᵀ equals Σ_t C_out(g_t) C_in(x_t)ᵀ because every stage is linear."""
        if G.dim() != 3 or tuple(G.shape[1:]) != (self.d_out, self.d_in):
            raise ValueError(f"{type(self).__name__}: G must be [batch, {self.d_out}, {self.d_in}], "
                             f"got {tuple(G.shape)}")
        xs = self.compress_in(G)                                         # [B, d_out, k_in']
        outer = self.compress_out(xs.transpose(1, 2).contiguous()).transpose(1, 2)
        return self.project(outer.reshape(outer.shape[0], -1))

    def describe(self) -> dict:
        return {"sparsification": merged_spec(self.compress_in, self.compress_out),
                "projection": self.project.spec, "k": self.k, "clamped": list(self.notes)}


class MaterializedLinearCompressor(nn.Module):
    """A non-factored spec on a linear layer: form G_b [d_out, d_in] by bmm, flatten, compress.

    Correct for any flat spec but O(d_out*d_in) memory per sample; prefer a factored spec."""

    def __init__(self, d_in: int, d_out: int, flat: nn.Module):
        super().__init__()
        self.d_in, self.d_out, self.k = d_in, d_out, flat.k
        self.flat = flat

    def forward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        x, g = check_pair(type(self).__name__, x, grad_out, self.d_in, self.d_out)
        G = torch.bmm(g.float().transpose(1, 2), x.float())
        return self.flat(G.reshape(G.shape[0], -1))

    def compress_matrix(self, G: torch.Tensor) -> torch.Tensor:
        """The same sketch from a formed gradient G [B, d_out, d_in]."""
        return self.flat(G.reshape(G.shape[0], -1))

    def describe(self) -> dict:
        return self.flat.describe()
