"""GradientSketcher: compressed per-sample gradients for a batch with one forward and one
backward pass.

Factored layers (nn.Linear, HF Conv1D, nn.MultiheadAttention's in-projection, nn.Conv1d/2d):
every use of the weight during the forward records its input x and the gradient edge of its
raw output (see _intercept.py); backward is then driven to those edges only, so no weight
gradient is formed and no ``.grad`` written. Each (x, Dy) pair goes to the layer's factored
compressor, which sketches Σ_t Dy_t x_tᵀ without forming it (tokens for a Linear, output
positions for a convolution, see _taps.py). A weight used several times per forward adds
its sketches (compressors are linear).

Flat layers (embeddings, norms, lone biases, ...) and any factored layer whose hooked capture
fails the check: per-sample gradients via torch.func (functional_call + vmap(grad)), then the
layer's own compressor (a factored one sketches the formed gradient the same way).

This module captures; check.py verifies the routes on the first batch (a layer that fails on
every layout moves to the exact path, it is never sketched wrong) and describe.py says what
was built.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import nn

from ..compress import layer_seed, make_compressor, parse_spec
from . import check as _check
from . import describe as _describe
from ._batch import batch_size, check_losses, per_example_grads
from ._intercept import Recorder
from ._taps import call_sketch
from .check import CHECK_EXAMPLES, MOVED_NOTE, check_finite  # noqa: F401  (re-exported)
from .describe import EXACT, ROUTE_TEXT
from .errors import CaptureError
from .exact import flatten_layer
from .layers import LayerInfo, left_out

log = logging.getLogger(__name__)


def _flat_spec(spec: str) -> str:
    """A factored spec (A*B) is meant for linear layers; for a flat parameter use the same kind
    with A*B coordinates, so one --sparsification works for every selected parameter."""
    parsed = parse_spec(spec)
    if not parsed.factored:
        return spec
    return str(dataclasses.replace(parsed, dims=(parsed.dims[0] * parsed.dims[1],)))


@contextlib.contextmanager
def _requires_grad(params: list[nn.Parameter]):
    """Turn on requires_grad for the selected parameters only for the duration of a call."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _check_layers(layers: list[LayerInfo], masks: dict) -> None:
    if not layers:
        raise CaptureError("no layers to capture; select some with select_layers()")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise CaptureError(f"duplicate layer names in {names}")
    unknown = sorted(set(masks) - set(names))
    if unknown:
        raise CaptureError(f"selective_masks names unknown layers {unknown}; layers are {names}")


class GradientSketcher:
    """Per-layer compressors for the selected layers, and ``sketch(batch, loss_fn)``.

    Each layer's compressor is seeded with ``layer_seed(seed, layer.name)``, so the same
    specs + seed reproduce the same projection. The model's train/eval mode is left alone.
    ``verify`` (default on) runs ``check`` on the first batch sketched. ``routes`` ({layer:
    route}, as ``describe()[layer]["capture"]`` or ``.route`` recorded them after a check,
    e.g. by the build a query is sketched for) reuses those checked routes instead.
    """

    def __init__(self, model: nn.Module, layers: list[LayerInfo], *, sparsification: str,
                 projection: str, seed: int = 0, clamp: bool = True,
                 selective_masks: dict | None = None, device=None, verify: bool = True,
                 routes: dict[str, str] | None = None):
        masks = dict(selective_masks or {})
        _check_layers(layers, masks)
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.model, self.layers, self.device = model, list(layers), torch.device(device)
        self.seed, self.sparsification, self.projection = seed, sparsification, projection
        params = dict(model.named_parameters())
        self._params = [params[p] for layer in layers for p in layer.param_names]
        self.compressors: dict[str, nn.Module] = {
            layer.name: self._compressor(layer, clamp, masks.get(layer.name)) for layer in layers}
        # what a forward reveals about each factored layer: the uses of its weight (F.linear,
        # F.conv*, and torch.addmm for HF's Conv1D)
        self._weights = {id(params[layer.param_names[0]]): layer.name
                         for layer in layers if layer.kind != "flat"}
        self.route: dict[str, str] = {
            layer.name: EXACT if layer.kind == "flat" else
            "seq_first" if self._in_attention(layer) else "batch_first" for layer in layers}
        self.notes: dict[str, list[str]] = {layer.name: [] for layer in layers}
        # layers with a zero gradient for every example the check saw (pass 1 reports the
        # ones zero for every training example: pipeline/sketching.py)
        self.zero: dict[str, bool] = {layer.name: True for layer in layers}
        self.left_out = left_out(model, layers)
        self.checked = not verify
        given = _describe.given_routes(routes, self.route) if routes else None
        if given is not None:
            self.route.update(given)
            self.checked = True
        self._warned_layout: set[str] = set()

    def _compressor(self, layer: LayerInfo, clamp: bool, mask) -> nn.Module:
        """The layer's compressor, seeded with ``layer_seed(seed, layer.name)``."""
        kw = dict(seed=layer_seed(self.seed, layer.name), clamp=clamp)
        if mask is not None:
            kw["mask_indices"] = mask
        if layer.kind != "flat":
            kw.update(d_in=layer.d_in_eff, d_out=layer.d_out)
        else:
            kw.update(d=layer.numel)
        try:
            sp = self.sparsification if layer.kind != "flat" else _flat_spec(self.sparsification)
            comp = make_compressor(sp, self.projection, **kw)
        except (ValueError, TypeError) as e:
            raise CaptureError(f"layer {layer.name} ({layer.kind}, "
                               f"{_describe.dims_text(layer)}): {e}") from e
        return comp.to(self.device)

    def _in_attention(self, layer: LayerInfo) -> bool:
        """nn.MultiheadAttention works sequence-first inside (it transposes batch-first
        inputs), for its in-projection and its out_proj alike."""
        name = layer.module_name or ""
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        mods = [self.model.get_submodule(name)]
        if name.endswith("out_proj"):
            mods.append(self.model.get_submodule(parent))
        return any(isinstance(m, nn.MultiheadAttention) for m in mods)

    def _width(self, layer: LayerInfo) -> int:
        return int(self.compressors[layer.name].k) * int(layer.groups)

    @property
    def layout(self) -> dict[str, int]:
        """Ordered {layer name: sketch width k_l}; the sketch concatenates layers in this order.
        A grouped convolution's width is groups × the compressor's k (one block per group)."""
        return {layer.name: self._width(layer) for layer in self.layers}

    @property
    def dim(self) -> int:
        return sum(self.layout.values())

    def fingerprint(self) -> str:
        """Hash of every compressor's buffers: equal fingerprints mean equal projections."""
        return _describe.fingerprint(self.compressors)

    def describe(self) -> dict[str, dict]:
        """Per layer: kind, shapes, compression, k, route and capture notes (describe.py)."""
        return _describe.describe(self)

    # ---------------------------------------------------------------- capture
    def sketch(self, batch, loss_fn) -> torch.Tensor:
        """[B, K] float32 CPU sketches of each example's loss gradient, layers in layout order
        (detached: plain data)."""
        if not self.checked:
            self.check(batch, loss_fn)
        hooked = [layer for layer in self.layers if self.route[layer.name] != EXACT]
        exact = [layer for layer in self.layers if self.route[layer.name] == EXACT]
        parts: dict[str, torch.Tensor] = {}
        if hooked:
            calls, grads, _, B = self._forward_backward(batch, loss_fn, hooked)
            for layer in hooked:
                s = self._hooked_sketch(layer, calls[layer.name], grads, B,
                                        self.route[layer.name])
                if s is None:  # this batch's shapes do not fit the layout the check chose
                    if layer.name not in self._warned_layout:
                        log.warning("layer %s: an input of this batch does not fit the %s layout "
                                    "chosen on the first batch; using torch.func for it",
                                    layer.name, self.route[layer.name])
                        self._warned_layout.add(layer.name)
                    exact.append(layer)
                else:
                    parts[layer.name] = s
        if exact:
            parts.update(self._exact_sketches(batch, loss_fn, exact))
        out = torch.cat([parts[layer.name] for layer in self.layers], dim=1)
        out = out.detach().to(device="cpu", dtype=torch.float32)
        # checked on the host copy: no device sync per layer
        start = 0
        for layer in self.layers:
            s = out[:, start:start + self._width(layer)]
            start += s.shape[1]
            check_finite(s, layer.name)
        return out

    def _forward_backward(self, batch, loss_fn, layers, extra: list[nn.Parameter] = ()):
        """One forward recording every use of the layers' weights, one backward to the
        recorded outputs (plus ``extra`` tensors, for the check). Returns ({layer: calls},
        {edge position: Dy}, grads of ``extra``, B)."""
        n = batch_size(batch)
        wanted = {layer.name for layer in layers}
        rec = Recorder({w: name for w, name in self._weights.items() if name in wanted})
        with _requires_grad(self._params), torch.enable_grad():
            with rec:
                losses = check_losses(loss_fn(self.model, batch), n)
            calls = [c for layer in layers for c in rec.calls.get(layer.name, [])]
            inputs = [c.edge for c in calls] + list(extra)
            got = torch.autograd.grad(losses.sum(), inputs, allow_unused=True) if inputs else ()
        grads = {id(c): g for c, g in zip(calls, got)}
        return rec.calls, grads, list(got[len(calls):]), int(losses.shape[0])

    def _hooked_sketch(self, layer, calls, grads, B: int, layout: str):
        """[B, width] sum of the layer's call sketches under ``layout``; None if a call does
        not fit it. No call (or no gradient reaching it) means a zero gradient."""
        comp = self.compressors[layer.name]
        acc = None
        with torch.no_grad():
            for c in calls:
                g = grads.get(id(c))
                if g is None:
                    continue
                s = call_sketch(comp, c, g, B, layout, layer.has_bias, self.device)
                if s is None:
                    return None
                acc = s if acc is None else acc + s
        if acc is None:
            acc = torch.zeros(B, self._width(layer), device=self.device)
        return acc.float()

    def _compress_formed(self, layer, G: torch.Tensor) -> torch.Tensor:
        """Sketch of formed gradients [B, numel] in the capture convention."""
        comp = self.compressors[layer.name]
        with torch.no_grad():
            if layer.kind == "flat":
                return comp(G.to(self.device, torch.float32)).float()
            B = G.shape[0]
            G = G.reshape(B * layer.groups, layer.d_out, layer.d_in_eff).to(self.device)
            if hasattr(comp, "compress_matrix"):
                s = comp.compress_matrix(G)
            else:  # any linear factored compressor: x_t = e_t, Dy_t = G[:, t] gives Σ = G
                eye = torch.eye(layer.d_in_eff, device=G.device, dtype=G.dtype)
                s = comp(eye.expand(G.shape[0], -1, -1), G.transpose(1, 2))
            return s.reshape(B, -1).float()

    def _exact_sketches(self, batch, loss_fn, layers) -> dict[str, torch.Tensor]:
        names = [p for layer in layers for p in layer.param_names]
        grads = per_example_grads(self.model, batch, loss_fn, names)
        out = {}
        for layer in layers:
            g = flatten_layer(self.model, layer, grads).detach()
            check_finite(g, layer.name, what="gradient")
            out[layer.name] = self._compress_formed(layer, g)
        return out

    # ---------------------------------------------------------------- the check
    def check(self, batch, loss_fn, *, strict: bool = True) -> dict[str, str]:
        """Verify every layer's capture on the first ``CHECK_EXAMPLES`` examples of ``batch``
        and fix its route; returns {layer: how it is captured}. A layer that no route captures
        exactly raises a CaptureError naming it and the --layers glob that excludes it (with
        ``strict=False`` it is recorded in ``failed`` instead, for a report). See check.py."""
        return _check.run_check(self, batch, loss_fn, strict=strict)

    def exclude_glob(self, name: str) -> str:
        """The --layers pattern that removes layer ``name``."""
        return _check.exclude_glob(next(layer for layer in self.layers if layer.name == name))

    def check_report(self) -> list[dict]:
        """One row per layer after ``check`` (layer, kind, route, status, note, exclude)."""
        return _check.check_report(self)
