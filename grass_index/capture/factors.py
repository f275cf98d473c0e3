"""Per-example gradient *factors* of linear layers: each example's input activations x_t and
output gradients Dy_t per token, whose sum of products Σ_t Dy_t x_tᵀ is its weight gradient.

Holding the factors costs T·(d_in + d_out) numbers per example instead of d_out·d_in (for
GPT-2's MLP at T=64: 0.25M instead of 2.4M), and a caller can form any example's gradient
from them when it needs it. The uses of each weight are seen exactly as GradientSketcher sees
them (same interception, same layout check on the first batch); layers the factored capture
cannot serve (convolutions, flat parameters, a layer whose check failed) come back as formed
exact per-example gradients instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._batch import per_example_grads
from ._taps import linear_tokens
from .exact import flatten_layer
from .layers import LayerInfo
from .sketcher import EXACT, GradientSketcher

# the check hashes each side to 8 signed buckets (SJLT): every coordinate of the gradient
# takes part, so a wrong layout cannot pass it, and it costs O(d) memory even for a large
# flat parameter
_CHECK_SPEC = "sjlt-8*8"


@dataclass
class LayerBatch:
    """One batch of one layer: ``x`` [B, T, d_in(+1 for the bias)] and ``dy`` [B, T, d_out]
    (factors), or ``grads`` [B, numel] (formed, in the capture convention)."""

    x: torch.Tensor | None = None
    dy: torch.Tensor | None = None
    grads: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int((self.grads if self.grads is not None else self.x).shape[0])

    @property
    def nbytes(self) -> int:
        ts = [t for t in (self.x, self.dy, self.grads) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


class FactorCapture:
    """Factors (or, where needed, exact gradients) of the selected layers, batch by batch.

    ``check(batch, loss_fn)`` must run first (on a batch of at least 2 examples): it fixes how
    each layer's uses are read, as GradientSketcher.check does, and never lets a layer be
    captured wrong.
    """

    def __init__(self, model: nn.Module, layers: list[LayerInfo]):
        self.model, self.layers = model, list(layers)
        self._sk = GradientSketcher(model, self.layers, sparsification=_CHECK_SPEC,
                                    projection="identity", clamp=True)

    def check(self, batch, loss_fn) -> dict[str, str]:
        return self._sk.check(batch, loss_fn)

    def factored(self, layer: LayerInfo) -> bool:
        """Whether the layer comes back as factors (else as formed gradients)."""
        return layer.kind == "linear" and self._sk.route[layer.name] != EXACT

    def capture(self, batch, loss_fn, layers: list[LayerInfo]) -> dict[str, LayerBatch]:
        """{layer name: LayerBatch} for ``layers`` (a subset of the selected ones), float32 on
        the CPU, detached. One forward + backward for the factored ones, torch.func for the
        rest."""
        if not self._sk.checked:
            raise RuntimeError("FactorCapture.check must run before capture")
        hooked = [layer for layer in layers if self.factored(layer)]
        exact = [layer for layer in layers if not self.factored(layer)]
        out: dict[str, LayerBatch] = {}
        if hooked:
            calls, grads, _, B = self._sk._forward_backward(batch, loss_fn, hooked)
            for layer in hooked:
                got = self._tokens(layer, calls[layer.name], grads, B)
                if got is None:       # this batch's shapes do not fit the checked layout
                    exact.append(layer)
                else:
                    out[layer.name] = got
            del calls, grads
        if exact:
            names = [p for layer in exact for p in layer.param_names]
            g = per_example_grads(self.model, batch, loss_fn, names)
            for layer in exact:
                out[layer.name] = LayerBatch(
                    grads=flatten_layer(self.model, layer, g).detach().float().cpu())
        return out

    def _tokens(self, layer: LayerInfo, calls, grads, B: int) -> LayerBatch | None:
        """Every use of the weight contributes its tokens (a shared weight's gradient is the
        sum over its uses, i.e. over the concatenated tokens)."""
        xs, gs = [], []
        route = self._sk.route[layer.name]
        with torch.no_grad():
            for c in calls:
                g = grads.get(id(c))
                if g is None:
                    continue
                pair = linear_tokens(c.x, g, B, route)
                if pair is None:
                    return None
                x = pair[0].float().cpu()
                if layer.has_bias:
                    x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
                xs.append(x)
                gs.append(pair[1].float().cpu())
        if not xs:   # the loss does not reach the layer: a zero gradient, one zero token
            return LayerBatch(x=torch.zeros(B, 1, layer.d_in_eff), dy=torch.zeros(B, 1, layer.d_out))
        return LayerBatch(x=torch.cat(xs, 1).contiguous(), dy=torch.cat(gs, 1).contiguous())
