"""One layer's sampled per-example gradients, held as cheaply as the memory budget allows, and
the masked Gram matrix K(w)_ij = Σ_c w_c² g_i[c] g_j[c] the mask fit differentiates.

A linear layer's gradients are held as factors (x_t, Dy_t per token, see
grass_index.capture.factors): an example's gradient g_i = Σ_t Dy_t x_tᵀ is formed only for
a block of examples at a time, and K and its derivative in w² are accumulated block by block
(custom backward: dK/d(w²) needs only the blocks again), so memory stays within the budget
whatever the layer and sample size. When every formed gradient fits in the budget they are
formed once and kept.
"""
from __future__ import annotations

import torch

from ..capture.factors import LayerBatch
from .errors import MaskFitError


class LayerGrads:
    """The n sampled examples' gradients of one layer ([n, numel], capture convention), scaled
    by one constant to unit mean square (the fit is scale-invariant; this keeps float32 safe).

    ``parts``: the layer's LayerBatch per capture batch, in sample order. ``shape``: (d_out,
    d_in + bias) for a linear layer, (numel,) otherwise. ``budget``: bytes this object may use
    beyond the parts themselves.
    """

    def __init__(self, name: str, parts: list[LayerBatch], shape: tuple[int, ...], budget: int):
        self.name, self.shape = name, tuple(shape)
        self.numel = 1
        for d in shape:
            self.numel *= int(d)
        self.n = sum(p.size for p in parts)
        row = self.numel * 4
        self.full: torch.Tensor | None = None
        self.plain = all(p.grads is not None for p in parts)
        if self.plain:
            # formed gradients (the exact route): as they are, in one tensor
            g = torch.cat([p.grads for p in parts]).double()
            self._finite(g)
            self.full = (g / g.pow(2).mean().sqrt().clamp_min(1e-300)).float()
            self.chunk = self.n
            return
        self.x, self.dy, self.start = [], [], []
        at = 0
        for p in parts:
            if p.grads is not None:   # a batch whose shapes did not fit the factored capture:
                eye = torch.eye(self.shape[1])   # x_t = e_t, Dy_t = g[:, t] gives Σ = g
                x = eye.expand(p.size, -1, -1).contiguous()
                dy = p.grads.reshape(p.size, *self.shape).transpose(1, 2).contiguous()
            else:
                x, dy = p.x, p.dy
            self._finite(x)
            self._finite(dy)
            self.x.append(x)
            self.dy.append(dy)
            self.start.append(at)
            at += p.size
        self.scale = 1.0
        # buffers of one block: about 8 live at once in the backward pass
        self.chunk = max(1, min(self.n, budget // (8 * row)))
        keep = self.n * row <= budget // 2     # every formed gradient fits: form them once
        whole = self.block(0, self.n) if keep else None
        ss = 0.0
        for lo, hi in self.chunks(0, self.n):
            ss += float((whole[lo:hi] if keep else self.block(lo, hi)).double().pow(2).sum())
        self.scale = 1.0 / max((ss / (self.n * self.numel)) ** 0.5, 1e-300)
        if keep:
            self.full = whole.mul_(self.scale)

    def _finite(self, t: torch.Tensor) -> None:
        if not torch.isfinite(t).all():
            raise MaskFitError(f"layer {self.name}: NaN/inf per-sample gradients; fix the model or "
                               "loss before fitting a mask")

    def chunks(self, lo: int, hi: int):
        for a in range(lo, hi, self.chunk):
            yield a, min(hi, a + self.chunk)

    def block(self, lo: int, hi: int) -> torch.Tensor:
        """[hi - lo, numel] gradients of examples lo..hi-1 (a view when kept, else formed)."""
        if self.full is not None:
            return self.full[lo:hi]
        out = torch.empty(hi - lo, self.shape[0], self.shape[1])
        for s, x, dy in zip(self.start, self.x, self.dy):
            a, b = max(lo, s), min(hi, s + x.shape[0])
            if a < b:
                torch.bmm(dy[a - s:b - s].transpose(1, 2), x[a - s:b - s], out=out[a - lo:b - lo])
        if self.scale != 1.0:
            out.mul_(self.scale)
        return out.reshape(hi - lo, self.numel)

    def gram(self, w2: torch.Tensor, rows: int, col0: int) -> torch.Tensor:
        """K(w)[:rows, col0:], differentiable in ``w2`` (the squared mask, [numel])."""
        if self.plain:   # formed gradients: plain autograd, in the order the fit always used
            gw = self.full[col0:] * w2
            ka = self.full[:min(rows, col0)] @ gw.T
            return ka if rows <= col0 else torch.cat([ka, gw @ self.full[col0:rows].T])
        return _MaskedGram.apply(w2, self, rows, col0)


class _MaskedGram(torch.autograd.Function):
    """K = G_R diag(w2) G_Cᵀ block by block; dL/dw2 = Σ_ij Γ_ij g_i ⊙ g_j with Γ = dL/dK,
    i.e. Σ_{row blocks} Σ_rows g_r ⊙ (Γ_{r,C} G_C), again block by block."""

    @staticmethod
    def forward(ctx, w2, lg: LayerGrads, rows: int, col0: int):
        ctx.lg, ctx.rows, ctx.col0 = lg, rows, col0
        K = w2.new_empty(rows, lg.n - col0)
        with torch.no_grad():
            for r0, r1 in lg.chunks(0, rows):
                h = lg.block(r0, r1) * w2
                for c0, c1 in lg.chunks(col0, lg.n):
                    K[r0:r1, c0 - col0:c1 - col0] = h @ lg.block(c0, c1).T
                del h
        return K

    @staticmethod
    def backward(ctx, grad):
        lg, rows, col0 = ctx.lg, ctx.rows, ctx.col0
        dw = torch.zeros(lg.numel, dtype=grad.dtype)
        with torch.no_grad():
            for r0, r1 in lg.chunks(0, rows):
                z = torch.zeros(r1 - r0, lg.numel, dtype=grad.dtype)
                for c0, c1 in lg.chunks(col0, lg.n):
                    z.addmm_(grad[r0:r1, c0 - col0:c1 - col0], lg.block(c0, c1))
                z.mul_(lg.block(r0, r1))
                dw += z.sum(0)
                del z
        return dw, None, None, None
