"""The capture check: before the first batch is sketched, each layer's route is verified on a
few examples and fixed (``GradientSketcher.check`` runs ``run_check``).

Per factored layer, each layout that fits is tried until the sum of the per-example sketches
equals the sketch of autograd's batch gradient and the first example's sketch equals the
sketch of its exact gradient, its loss differentiated alone (which catches sequence-first
layouts even when T == B); if none passes the layer moves to the exact route (torch.func
per-example gradients) with a note. The exact route must itself add up to the batch gradient:
a layer where it does not (one example's loss depends on others) cannot be captured exactly
by any route and fails, naming the ``--layers`` glob that excludes it. It is never sketched
wrong.

A few examples suffice: a missed use of the weight, a sequence-first layout or a loss that
couples examples shows on any of them, and the check's backward (the only one that forms
weight gradients) then costs a fraction of one batch's. The reference is a forward of the
example alone, not its loss isolated in the batch's forward (the others weighted 0: one
forward fewer), because only alone does it differ when the examples are coupled before every
captured layer (BatchNorm in train mode, inputs standardised over the batch). It runs as a
plain forward + backward, not through torch.func, whose import (torch._dynamo) cost more
than the rest of the check on a small model (docs/measurements.md, "The capture check's
cost").
"""
from __future__ import annotations

import logging

import torch
from torch.utils import _pytree as pytree

from ..compress.factored import FactoredCompressor
from ..errors import option
from ._batch import batch_size, check_loss_shape, per_example_grads
from ._taps import LAYOUTS
from .describe import EXACT, ROUTE_TEXT
from .errors import CaptureError
from .exact import flatten_layer
from .layers import LayerInfo, linear_dims

log = logging.getLogger(__name__)

CHECK_EXAMPLES = 4  # examples of the first batch the capture check runs on
REFERENCE_EXAMPLES = 1  # of those, the ones compared with their exact single-example gradients
MOVED_NOTE = "the weight's uses are not all seen by the factored capture"


def exclude_glob(layer: LayerInfo) -> str:
    """The --layers pattern that removes this layer."""
    if layer.kind == "flat":
        return f"!{layer.param_names[0]}"
    return f"!{layer.module_name}.*"


def _tolerance(dtype: torch.dtype) -> float:
    return 0.1 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def _rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    a, b = a.double(), b.double()
    scale = max(float(a.norm()), float(b.norm()), floor)
    return 0.0 if scale == 0.0 else float((a - b).norm()) / scale


def _sum_error(S: torch.Tensor, want: torch.Tensor, B: int) -> float:
    """Relative error of the summed per-example sketches against the batch's sketch, with
    the per-example size as a floor (a gradient that cancels over the batch is still 0)."""
    rms = float(S.double().norm()) / max(1, B) ** 0.5
    return _rel_err(S.sum(0), want, floor=rms)


def first_examples(batch, n: int, m: int):
    """The first m examples of a batch of n."""
    return pytree.tree_map(
        lambda t: t[:m] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t,
        batch)


def _sketch_grads(sk, layer: LayerInfo, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, width] sketch of one layer's formed gradients ({param: [B, *shape]}). HF Conv1D
    stores its weight transposed ([d_in, d_out]); its gradient goes to the compressor as d_in
    tokens (x_t = e_t, Dy_t = row t: Σ_t Dy_t x_tᵀ is the gradient), the bias one more, so
    it is never copied transposed (flatten_layer's copy was most of the check's sketching).
    Only a factored compressor takes that path cheaply, and only without an observer (EK-FAC's
    factors would see these tokens)."""
    comp = sk.compressors[layer.name]
    module = sk.model.get_submodule(layer.module_name) if layer.kind == "linear" else None
    if module is None or not (linear_dims(module) or (0, 0, False))[2] \
            or not isinstance(comp, FactoredCompressor) or comp.observer is not None:
        return sk._compress_formed(layer, flatten_layer(sk.model, layer, grads).detach())
    rows = [grads[p].detach().to(sk.device, torch.float32) for p in layer.param_names]
    rows[1:] = [b.unsqueeze(1) for b in rows[1:]]  # the bias: one more token, x_t = e_d_in
    eye, start, out = torch.eye(layer.d_in_eff, device=sk.device), 0, 0
    with torch.no_grad():  # the sketch is linear in the tokens: a sum over the two parts
        for r in rows:
            B, n = r.shape[0], r.shape[1]
            out = out + comp(eye[start:start + n].expand(B, -1, -1), r).reshape(B, -1)
            start += n
    return out.float()


def _batch_sketches(sk, batch, whole, loss_fn):
    """The hooked capture of the factored layers and, from the same backward, the sketch of
    autograd's batch gradient of every layer: (calls, grads, {layer: [k]}, B)."""
    params = dict(sk.model.named_parameters())
    names = [p for layer in sk.layers for p in layer.param_names]
    factored = [layer for layer in sk.layers if layer.kind != "flat"]
    try:
        calls, grads, batch_grads, B = sk._forward_backward(batch, loss_fn, factored,
                                                            [params[p] for p in names])
    except CaptureError:
        if whole is not batch:  # a wrong loss shape, said for the batch the user passed
            with torch.no_grad():
                check_loss_shape(loss_fn(sk.model, whole), batch_size(whole))
        raise
    summed = {p: (torch.zeros_like(params[p]) if g is None else g.detach())[None]
              for p, g in zip(names, batch_grads)}
    del batch_grads
    batch_sketch = {layer.name: _sketch_grads(sk, layer, summed)[0] for layer in sk.layers}
    return calls, grads, batch_sketch, B


def _references(sk, batch, n: int, m: int, loss_fn) -> dict[str, torch.Tensor]:
    """Sketches of the exact gradients of the first m examples, every layer, each example's
    loss differentiated alone (a batch of one)."""
    if not m:
        return {}
    names = [p for layer in sk.layers for p in layer.param_names]
    try:  # one plain forward + backward per example: vmap would cost as much for so few, and
        # importing torch.func (torch._dynamo) more than the whole check on a small model
        grads = per_example_grads(sk.model, first_examples(batch, n, m), loss_fn, names,
                                  method="loop")
    except CaptureError:
        raise
    except (RuntimeError, ValueError) as e:
        raise CaptureError(
            f"checking the capture needs the loss of single examples, which failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); a model in train "
            "mode with BatchNorm cannot give per-example gradients: call model.eval()"
        ) from e
    return {layer.name: _sketch_grads(sk, layer, grads) for layer in sk.layers}


def _choose_layout(sk, layer, calls, grads, B: int, want, ref, m: int, tol: float) -> bool:
    """Fix the first layout whose hooked sketches are exact; else move the layer to the
    exact route with a note. True when a layout was chosen."""
    first = sk.route[layer.name]
    failures = []
    for layout in [first] + [lo for lo in LAYOUTS if lo != first]:
        S = sk._hooked_sketch(layer, calls[layer.name], grads, B, layout)
        if S is None:
            continue
        check_finite(S, layer.name)
        e_sum = _sum_error(S, want, B)
        e_ex = max((_rel_err(S[i], ref[layer.name][i]) for i in range(m)), default=0.0)
        if e_sum <= tol and e_ex <= tol:
            sk.route[layer.name] = layout
            if bool((S != 0).any()):
                sk.zero[layer.name] = False
            return True
        failures.append(f"{layout}: sum rel. err {e_sum:.2g}, per-example {e_ex:.2g}")
    sk.route[layer.name] = EXACT
    why = ("no F.linear/F.conv call with this weight was seen" if not calls.get(layer.name)
           else "; ".join(failures) or "its inputs fit no batch layout")
    sk.notes[layer.name].append(f"{MOVED_NOTE} ({why}); captured exactly from torch.func "
                                "per-example gradients instead (slower)")
    return False


def _check_exact_route(sk, batch, loss_fn, layers, batch_sketch, B: int, tols) -> None:
    """The exact route must itself add up to the batch gradient (a loss whose examples
    depend on each other, e.g. BatchNorm in train mode, has no per-example gradient)."""
    sketches = sk._exact_sketches(batch, loss_fn, layers)
    for layer in layers:
        S = sketches[layer.name]
        check_finite(S, layer.name)
        err = _sum_error(S, batch_sketch[layer.name], B)
        if err > tols[layer.name]:
            sk.failed[layer.name] = (
                f"layer {layer.name} cannot be captured exactly: its per-example "
                f"gradients do not add up to the batch gradient (rel. err {err:.2g}), so "
                "one example's loss depends on other examples of the batch (BatchNorm "
                "in train mode? in-batch negatives?). Exclude it with "
                f"{option('layers', exclude_glob(layer))} or make the loss per-example")
        elif bool((S != 0).any()):
            sk.zero[layer.name] = False


def _report_notes(sk, n: int) -> None:
    """Log the route changes that stand, and note the layers no checked example reaches."""
    for layer in sk.layers:
        if layer.name in sk.failed:
            continue
        for note in sk.notes[layer.name]:
            log.warning("layer %s: %s", layer.name, note)
        if sk.zero[layer.name]:
            note = (f"zero gradient for every one of the {n} examples checked: the loss "
                    "may not reach this layer (the build reports the layers whose "
                    "gradient is zero for every training example)")
            sk.notes[layer.name].append(note)
            log.warning("layer %s: %s", layer.name, note)


def _failure(sk) -> CaptureError:
    """One error for the failed layers: the first one's message, the others' globs."""
    first, *more = sk.failed
    extra = (f" (also: {', '.join(more)}: exclude with "
             + " ".join(option("layers", sk.exclude_glob(x)) for x in more) + ")"
             if more else "")
    return CaptureError(sk.failed[first] + extra, layer=first)


def run_check(sk, batch, loss_fn, *, strict: bool = True) -> dict[str, str]:
    """Verify and fix every layer's route of sketcher ``sk`` on the first ``CHECK_EXAMPLES``
    examples of ``batch``; returns {layer: how it is captured}. A layer no route captures
    exactly raises a CaptureError (with ``strict=False`` it is kept in ``sk.failed``
    instead, for a report)."""
    whole, n = batch, batch_size(batch)
    if n and n > CHECK_EXAMPLES:
        batch, n = first_examples(batch, n, CHECK_EXAMPLES), CHECK_EXAMPLES
    sk.failed = {}
    if sk.left_out:
        log.info("not attributed (%d trainable parameters): %s", len(sk.left_out),
                 "; ".join(f"{k}: {v}" for k, v in sk.left_out.items()))
    calls, grads, batch_sketch, B = _batch_sketches(sk, batch, whole, loss_fn)
    m = min(REFERENCE_EXAMPLES, n) if n else 0
    ref = _references(sk, batch, n, m, loss_fn)
    params = dict(sk.model.named_parameters())
    tols = {layer.name: _tolerance(params[layer.param_names[0]].dtype) for layer in sk.layers}
    exact_needed = [layer for layer in sk.layers if layer.kind == "flat" or not _choose_layout(
        sk, layer, calls, grads, B, batch_sketch[layer.name], ref, m, tols[layer.name])]
    if exact_needed:
        _check_exact_route(sk, batch, loss_fn, exact_needed, batch_sketch, B, tols)
    _report_notes(sk, n)
    sk.checked = True
    if sk.failed and strict:
        raise _failure(sk)
    return {layer.name: ROUTE_TEXT[sk.route[layer.name]] for layer in sk.layers}


def check_report(sk) -> list[dict]:
    """One row per layer of sketcher ``sk`` after its check: layer, kind, route ("factored",
    "flat", "moved-to-flat" when the check moved a factored layer to torch.func, "none" when
    no route is exact), status ("ok", "zero-gradient" or "failed"), note, and for a failed
    layer the glob excluding it."""
    rows = []
    for layer in sk.layers:
        moved = layer.kind != "flat" and sk.route[layer.name] == EXACT
        route = "moved-to-flat" if moved else ("flat" if layer.kind == "flat" else "factored")
        failed = getattr(sk, "failed", {}).get(layer.name)
        if failed:
            route = "none"
        status = "failed" if failed else ("zero-gradient" if sk.zero[layer.name] else "ok")
        row = dict(layer=layer.name, kind=layer.kind, route=route,
                   capture=ROUTE_TEXT[sk.route[layer.name]], status=status,
                   note=failed or "; ".join(sk.notes[layer.name]))
        if failed:
            row["exclude"] = option("layers", exclude_glob(layer))
        rows.append(row)
    return rows


def check_finite(s: torch.Tensor, layer: str, what: str = "gradient sketch"):
    """NaN/inf would silently poison F and every score; name the example and the layer."""
    bad = ~torch.isfinite(s).all(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise CaptureError(
            f"non-finite (NaN/inf) {what} for example {i} of the batch in layer {layer}; check the "
            f"loss and the inputs of that example (e.g. log(0), overflow in half precision)",
            example=i, layer=layer)
