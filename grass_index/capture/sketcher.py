"""GradientSketcher: compressed per-sample gradients for a batch with one forward and one
backward pass.

Linear layers (nn.Linear, HF Conv1D): a forward hook saves the layer input x and puts a
tensor hook on the output; when backward reaches the output, the hook hands (x, Dy) to the
layer's factored compressor, which sketches Σ_t Dy_t x_tᵀ without forming it. A module called
several times per forward adds its sketches (compressors are linear).

Flat layers (embeddings, norms, lone biases, ...): per-sample gradients via torch.func
(functional_call + vmap(grad)), then the flat compressor. This costs one extra vmapped
forward+backward, paid only when such parameters are selected.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging

import torch
from torch import nn

from ..compress import layer_seed, make_compressor, parse_spec
from ._batch import batch_size, check_losses, per_example_grads
from .errors import CaptureError
from .exact import flatten_layer
from .layers import LayerInfo

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


class GradientSketcher:
    """Per-layer compressors for the selected layers, and ``sketch(batch, loss_fn)``.

    Each layer's compressor is seeded with ``layer_seed(seed, layer.name)``, so the same
    specs + seed reproduce the same projection. The model's train/eval mode is left alone.
    """

    def __init__(self, model: nn.Module, layers: list[LayerInfo], *, sparsification: str,
                 projection: str, seed: int = 0, clamp: bool = True,
                 selective_masks: dict | None = None, device=None):
        if not layers:
            raise CaptureError("no layers to capture; select some with select_layers()")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise CaptureError(f"duplicate layer names in {names}")
        masks = dict(selective_masks or {})
        unknown = sorted(set(masks) - set(names))
        if unknown:
            raise CaptureError(f"selective_masks names unknown layers {unknown}; layers are {names}")
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.model, self.layers, self.device = model, list(layers), torch.device(device)
        self.seed, self.sparsification, self.projection = seed, sparsification, projection
        params = dict(model.named_parameters())
        self._params = [params[p] for layer in layers for p in layer.param_names]
        self.compressors: dict[str, nn.Module] = {}
        for layer in layers:
            kw = dict(seed=layer_seed(seed, layer.name), clamp=clamp)
            if layer.name in masks:
                kw["mask_indices"] = masks[layer.name]
            if layer.kind == "linear":
                kw.update(d_in=layer.d_in_eff, d_out=layer.d_out)
            else:
                kw.update(d=layer.numel)
            try:
                sp = sparsification if layer.kind == "linear" else _flat_spec(sparsification)
                comp = make_compressor(sp, projection, **kw)
            except (ValueError, TypeError) as e:
                raise CaptureError(f"layer {layer.name} ({layer.kind}, {self._dims(layer)}): {e}") from e
            self.compressors[layer.name] = comp.to(self.device)
        self._modules = {}  # layer name -> distinct module objects to hook
        for layer in layers:
            if layer.kind == "linear":
                mods = {}
                for mname in layer.module_names or [layer.module_name]:
                    mod = model.get_submodule(mname)
                    mods[id(mod)] = mod
                self._modules[layer.name] = list(mods.values())

    @staticmethod
    def _dims(layer: LayerInfo) -> str:
        if layer.kind == "linear":
            return f"d_in={layer.d_in}{'+1 bias' if layer.has_bias else ''}, d_out={layer.d_out}"
        return f"numel={layer.numel}"

    @property
    def layout(self) -> dict[str, int]:
        """Ordered {layer name: sketch width k_l}; the sketch concatenates layers in this order."""
        return {name: int(c.k) for name, c in self.compressors.items()}

    @property
    def dim(self) -> int:
        return sum(self.layout.values())

    def fingerprint(self) -> str:
        """Hash of every compressor's buffers (index maps, signs, matrices). Equal fingerprints
        mean equal projections, so an index can refuse queries sketched by a library version
        that draws them differently even when every dimension matches."""
        h = hashlib.sha256()
        for name, comp in self.compressors.items():
            h.update(name.encode())
            for key, t in comp.state_dict().items():
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, dict]:
        """Per layer: kind, shapes, effective compression (after any clamping), k."""
        out = {}
        for layer in self.layers:
            d = dict(kind=layer.kind, module=layer.module_name, params=list(layer.param_names),
                     d_in=layer.d_in, d_out=layer.d_out, has_bias=layer.has_bias,
                     numel=layer.numel, seed=layer_seed(self.seed, layer.name),
                     requested={"sparsification": self.sparsification,
                                "projection": self.projection})
            d.update(self.compressors[layer.name].describe())
            out[layer.name] = d
        return out

    # ---------------------------------------------------------------- capture
    def sketch(self, batch, loss_fn) -> torch.Tensor:
        """[B, K] float32 CPU sketches of each example's loss gradient, layers in layout order."""
        n = batch_size(batch)
        linear = [layer for layer in self.layers if layer.kind == "linear"]
        flat = [layer for layer in self.layers if layer.kind == "flat"]
        parts: dict[str, torch.Tensor] = {}
        if linear:
            parts.update(self._sketch_linear(batch, loss_fn, linear, n))
        if flat:
            parts.update(self._sketch_flat(batch, loss_fn, flat))
        out = torch.cat([parts[layer.name] for layer in self.layers], dim=1)
        return out.to(device="cpu", dtype=torch.float32)

    def _sketch_linear(self, batch, loss_fn, layers, n) -> dict[str, torch.Tensor]:
        acc: dict[str, torch.Tensor | None] = {layer.name: None for layer in layers}
        state = {"B": n}
        handles = []

        def make_hooks(layer: LayerInfo):
            comp = self.compressors[layer.name]

            def tap(grad_out, x):
                with torch.no_grad():
                    B = x.shape[0]
                    xs = x.reshape(B, -1, x.shape[-1]).to(self.device, _float(x.dtype))
                    if layer.has_bias:
                        xs = torch.cat([xs, xs.new_ones(xs.shape[:-1] + (1,))], dim=-1)
                    gs = grad_out.reshape(B, -1, grad_out.shape[-1]).to(self.device, _float(x.dtype))
                    s = comp(xs, gs)
                    acc[layer.name] = s if acc[layer.name] is None else acc[layer.name] + s

            def fwd_hook(module, args, kwargs, output):
                if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) \
                        or not output.requires_grad:
                    return
                x = args[0] if args else next(iter(kwargs.values()), None)
                if not isinstance(x, torch.Tensor):
                    raise CaptureError(f"layer {layer.name}: expected a tensor input, got "
                                       f"{type(x).__name__}")
                if state["B"] is None:
                    state["B"] = int(x.shape[0])
                if x.dim() < 2 or x.shape[0] != state["B"]:
                    raise CaptureError(
                        f"layer {layer.name} got input of shape {tuple(x.shape)}, whose first "
                        f"dimension is not the batch size {state['B']}; per-example capture needs "
                        f"batch-first inputs [B, ..., d]. Exclude this layer with --layers")
                saved = x.detach()
                output.register_hook(lambda g: tap(g, saved))

            return fwd_hook

        try:
            for layer in layers:
                for mod in self._modules[layer.name]:
                    handles.append(mod.register_forward_hook(make_hooks(layer), with_kwargs=True))
            with _requires_grad(self._params), torch.enable_grad():
                losses = check_losses(loss_fn(self.model, batch), state["B"])
                state["B"] = losses.shape[0]
                # differentiate w.r.t. the weights only to drive backward through every hooked
                # output; the returned gradients are discarded and no .grad is written
                targets = [self.model.get_parameter(layer.param_names[0]) for layer in layers]
                torch.autograd.grad(losses.sum(), targets, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        B = state["B"]
        out = {}
        for layer in layers:
            s = acc[layer.name]
            if s is None:  # module not used in this forward: its gradient is zero
                s = torch.zeros(B, self.compressors[layer.name].k, device=self.device)
            _check_finite(s, layer.name)
            out[layer.name] = s.float()
        return out

    def _sketch_flat(self, batch, loss_fn, layers) -> dict[str, torch.Tensor]:
        names = [p for layer in layers for p in layer.param_names]
        grads = per_example_grads(self.model, batch, loss_fn, names)
        out = {}
        for layer in layers:
            g = flatten_layer(self.model, layer, grads).to(self.device, torch.float32)
            _check_finite(g, layer.name, what="gradient")
            with torch.no_grad():
                s = self.compressors[layer.name](g)
            _check_finite(s, layer.name)
            out[layer.name] = s.float()
        return out


def _float(dtype: torch.dtype) -> torch.dtype:
    """Half-precision activations go to the compressor as they are (it accumulates in float32);
    anything else as float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _check_finite(s: torch.Tensor, layer: str, what: str = "gradient sketch"):
    """NaN/inf would silently poison F and every score; name the example and the layer."""
    bad = ~torch.isfinite(s).all(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise CaptureError(
            f"non-finite (NaN/inf) {what} for example {i} of the batch in layer {layer}; check the "
            f"loss and the inputs of that example (e.g. log(0), overflow in half precision)",
            example=i, layer=layer)
