"""What a GradientSketcher records about itself: per layer, its shapes, compression and route
(``describe``, written to build.json), and the fingerprint of its projections."""
from __future__ import annotations

import hashlib

import torch

from ..compress import layer_seed
from .layers import LayerInfo

EXACT = "exact"  # route of a layer sketched from torch.func per-example gradients
ROUTE_TEXT = {"batch_first": "hooks", "seq_first": "hooks (sequence-first input)",
              EXACT: "torch.func (exact per-example gradients)"}


def dims_text(layer: LayerInfo) -> str:
    """A layer's shape in one phrase, for messages."""
    if layer.kind != "flat":
        groups = f", groups={layer.groups}" if layer.groups != 1 else ""
        return (f"d_in={layer.d_in}{'+1 bias' if layer.has_bias else ''}, "
                f"d_out={layer.d_out}{groups}")
    return f"numel={layer.numel}"


def given_routes(routes: dict[str, str], defaults: dict[str, str]) -> dict[str, str] | None:
    """Routes recorded by an earlier check ({layer: route key or its describe() text}) when
    they cover every layer and are possible (a flat layer is only ever exact), else None."""
    known = {text: key for key, text in ROUTE_TEXT.items()}
    given = {name: known.get(r, r) for name, r in routes.items() if name in defaults}
    if len(given) == len(defaults) and all(
            r in ROUTE_TEXT and (r == EXACT or defaults[n] != EXACT) for n, r in given.items()):
        return given
    return None


def describe(sk) -> dict[str, dict]:
    """Per layer of sketcher ``sk``: kind, shapes, effective compression (after any
    clamping), k, how it is captured and any capture notes (route changes, zero gradients)."""
    out = {}
    for layer in sk.layers:
        d = dict(kind=layer.kind, module=layer.module_name, params=list(layer.param_names),
                 d_in=layer.d_in, d_out=layer.d_out, has_bias=layer.has_bias,
                 numel=layer.numel, seed=layer_seed(sk.seed, layer.name),
                 requested={"sparsification": sk.sparsification,
                            "projection": sk.projection})
        if layer.groups != 1:
            d["groups"] = layer.groups
        d.update(sk.compressors[layer.name].describe())
        if layer.groups != 1:
            d["k"] = sk.layout[layer.name]
        d["capture"] = ROUTE_TEXT[sk.route[layer.name]]
        d["checked"] = sk.checked
        d["notes"] = list(sk.notes[layer.name])
        out[layer.name] = d
    return out


def fingerprint(compressors: dict) -> str:
    """Hash of every compressor's buffers (index maps, signs, matrices). Equal fingerprints
    mean equal projections, so an index can refuse queries sketched by a library version
    that draws them differently even when every dimension matches."""
    h = hashlib.sha256()
    for name, comp in compressors.items():
        h.update(name.encode())
        for key, t in comp.state_dict().items():
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
