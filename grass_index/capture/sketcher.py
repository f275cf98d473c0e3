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
fails the check below: per-sample gradients via torch.func (functional_call + vmap(grad)),
then the layer's own compressor (a factored one sketches the formed gradient the same way).

The first few examples of the first batch are checked (``check``): per layer, the sum over
them of the per-example sketches must equal the sketch of autograd's batch gradient, and the
sketches of 2 examples must equal the sketches of their exact torch.func gradients (which
catches sequence-first layouts even when T == B). A layer that fails on every layout moves to
the exact path with a note in ``describe()``; it is never sketched wrong.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..compress import layer_seed, make_compressor, parse_spec
from ._batch import batch_size, check_loss_shape, check_losses, per_example_grads
from ._intercept import Recorder, recording
from ._taps import LAYOUTS, call_sketch
from ..errors import option
from .errors import CaptureError
from .exact import flatten_layer
from .layers import LayerInfo, left_out, linear_dims

log = logging.getLogger(__name__)

EXACT = "exact"  # route of a layer sketched from torch.func per-example gradients
CHECK_EXAMPLES = 4  # examples of the first batch the capture check runs on
MOVED_NOTE = "the weight's uses are not all seen by the factored capture"
_ROUTE_TEXT = {"batch_first": "hooks", "seq_first": "hooks (sequence-first input)",
               EXACT: "torch.func (exact per-example gradients)"}


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


def _glob(layer: LayerInfo) -> str:
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


def _first(batch, n: int, m: int):
    """The first m examples of a batch of n."""
    return pytree.tree_map(
        lambda t: t[:m] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t,
        batch)


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
            if layer.kind != "flat":
                kw.update(d_in=layer.d_in_eff, d_out=layer.d_out)
            else:
                kw.update(d=layer.numel)
            try:
                sp = sparsification if layer.kind != "flat" else _flat_spec(sparsification)
                comp = make_compressor(sp, projection, **kw)
            except (ValueError, TypeError) as e:
                raise CaptureError(f"layer {layer.name} ({layer.kind}, {self._dims(layer)}): {e}") from e
            self.compressors[layer.name] = comp.to(self.device)
        # what a forward can reveal about each factored layer: its weight (seen in F.linear /
        # F.conv*) and the HF Conv1D modules that use it (seen through forward hooks)
        self._weights: dict[int, str] = {}
        self._conv1d: dict[str, list[nn.Module]] = {}
        self.route: dict[str, str] = {}
        for layer in layers:
            if layer.kind == "flat":
                self.route[layer.name] = EXACT
                continue
            self._weights[id(params[layer.param_names[0]])] = layer.name
            mods = {id(m): m for m in (model.get_submodule(n) for n in
                                       layer.module_names or [layer.module_name])
                    if (linear_dims(m) or (0, 0, False))[2]}
            self._conv1d[layer.name] = list(mods.values())
            self.route[layer.name] = "seq_first" if self._in_attention(layer) else "batch_first"
        self.notes: dict[str, list[str]] = {layer.name: [] for layer in layers}
        # layers with a zero gradient for every example the check saw (pass 1 reports the
        # ones zero for every training example: pipeline/sketching.py)
        self.zero: dict[str, bool] = {layer.name: True for layer in layers}
        self.left_out = left_out(model, layers)
        self.checked = not verify
        if routes:
            known = {text: key for key, text in _ROUTE_TEXT.items()}
            given = {name: known.get(r, r) for name, r in routes.items() if name in self.route}
            if len(given) == len(self.layers) and all(
                    r in _ROUTE_TEXT and (r == EXACT or self.route[n] != EXACT)
                    for n, r in given.items()):
                self.route.update(given)
                self.checked = True
        self._warned_layout: set[str] = set()

    def _in_attention(self, layer: LayerInfo) -> bool:
        """nn.MultiheadAttention works sequence-first inside (it transposes batch-first
        inputs), for its in-projection and its out_proj alike."""
        name = layer.module_name or ""
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        mods = [self.model.get_submodule(name)]
        if name.endswith("out_proj"):
            mods.append(self.model.get_submodule(parent))
        return any(isinstance(m, nn.MultiheadAttention) for m in mods)

    @staticmethod
    def _dims(layer: LayerInfo) -> str:
        if layer.kind != "flat":
            groups = f", groups={layer.groups}" if layer.groups != 1 else ""
            return (f"d_in={layer.d_in}{'+1 bias' if layer.has_bias else ''}, "
                    f"d_out={layer.d_out}{groups}")
        return f"numel={layer.numel}"

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
        """Per layer: kind, shapes, effective compression (after any clamping), k, how it is
        captured and any capture notes (route changes, zero gradients)."""
        out = {}
        for layer in self.layers:
            d = dict(kind=layer.kind, module=layer.module_name, params=list(layer.param_names),
                     d_in=layer.d_in, d_out=layer.d_out, has_bias=layer.has_bias,
                     numel=layer.numel, seed=layer_seed(self.seed, layer.name),
                     requested={"sparsification": self.sparsification,
                                "projection": self.projection})
            if layer.groups != 1:
                d["groups"] = layer.groups
            d.update(self.compressors[layer.name].describe())
            if layer.groups != 1:
                d["k"] = self._width(layer)
            d["capture"] = _ROUTE_TEXT[self.route[layer.name]]
            d["checked"] = self.checked
            d["notes"] = list(self.notes[layer.name])
            out[layer.name] = d
        return out

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
            _check_finite(s, layer.name)
        return out

    def _forward_backward(self, batch, loss_fn, layers, extra: list[nn.Parameter] = ()):
        """One forward recording every use of the layers' weights, one backward to the
        recorded outputs (plus ``extra`` tensors, for the check). Returns ({layer: calls},
        {edge position: Dy}, grads of ``extra``, B)."""
        n = batch_size(batch)
        rec = Recorder({w: name for w, name in self._weights.items()
                        if name in {layer.name for layer in layers}})
        handles = []
        for layer in layers:
            for mod in self._conv1d.get(layer.name, []):
                handles.append(mod.register_forward_hook(self._conv1d_hook(rec, layer.name),
                                                         with_kwargs=True))
        try:
            with _requires_grad(self._params), torch.enable_grad():
                with recording(rec):
                    losses = check_losses(loss_fn(self.model, batch), n)
                for h in handles:
                    h.remove()
                handles = []
                calls = [c for layer in layers for c in rec.calls.get(layer.name, [])]
                inputs = [c.edge for c in calls] + list(extra)
                got = torch.autograd.grad(losses.sum(), inputs, allow_unused=True) \
                    if inputs else ()
        finally:
            for h in handles:
                h.remove()
        grads = {id(c): g for c, g in zip(calls, got)}
        return rec.calls, grads, list(got[len(calls):]), int(losses.shape[0])

    @staticmethod
    def _conv1d_hook(rec: Recorder, name: str):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()), None)
            rec.record(name, "linear", x, output)
        return hook

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
            _check_finite(g, layer.name, what="gradient")
            out[layer.name] = self._compress_formed(layer, g)
        return out

    # ---------------------------------------------------------------- the check
    def check(self, batch, loss_fn, *, strict: bool = True) -> dict[str, str]:
        """Verify every layer's capture on the first ``CHECK_EXAMPLES`` examples of ``batch``
        and fix its route; returns {layer: how it is captured}. Per factored layer, each
        layout that fits is tried until the sum of the per-example sketches equals the sketch
        of autograd's batch gradient and the first 2 examples equal the sketches of their
        torch.func gradients; if none passes the layer is captured from torch.func gradients.
        A layer whose per-example gradients (exact or not) cannot add up to the batch gradient
        cannot be captured exactly by any route: an error naming it and the --layers glob that
        excludes it (with ``strict=False`` it is recorded in ``failed`` instead, for a report).
        Layers with a zero gradient for every checked example get a note.

        A few examples suffice: a missed use of the weight, a sequence-first layout or a loss
        that couples examples shows on any of them, and the check's backward (the only one that
        forms weight gradients) then costs a fraction of one batch's."""
        whole, n = batch, batch_size(batch)
        if n and n > CHECK_EXAMPLES:
            batch = _first(batch, n, CHECK_EXAMPLES)
            n = CHECK_EXAMPLES
        params = dict(self.model.named_parameters())
        names = [p for layer in self.layers for p in layer.param_names]
        factored = [layer for layer in self.layers if layer.kind != "flat"]
        self.failed: dict[str, str] = {}
        if self.left_out:
            log.info("not attributed (%d trainable parameters): %s", len(self.left_out),
                     "; ".join(f"{k}: {v}" for k, v in self.left_out.items()))
        # hooked capture and the batch gradient of every selected parameter, one backward
        targets = [params[p] for p in names]
        try:
            calls, grads, batch_grads, B = self._forward_backward(batch, loss_fn, factored,
                                                                  targets)
        except CaptureError:
            if whole is not batch:  # a wrong loss shape, said for the batch the user passed
                with torch.no_grad():
                    check_loss_shape(loss_fn(self.model, whole), batch_size(whole))
            raise
        whole = {p: (torch.zeros_like(params[p]) if g is None else g.detach())[None]
                 for p, g in zip(names, batch_grads)}
        del batch_grads
        batch_sketch = {layer.name: self._compress_formed(
            layer, flatten_layer(self.model, layer, whole))[0] for layer in self.layers}
        del whole

        # exact references: 2 examples, every layer, one torch.func call
        m = min(2, n) if n else 0
        ref: dict[str, torch.Tensor] = {}
        if m:
            try:
                grads2 = per_example_grads(self.model, _first(batch, n, m), loss_fn, names)
            except CaptureError:
                raise
            except (RuntimeError, ValueError) as e:
                raise CaptureError(
                    f"checking the capture needs the loss of single examples, which failed "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); a model in train "
                    "mode with BatchNorm cannot give per-example gradients: call model.eval()"
                ) from e
            for layer in self.layers:
                ref[layer.name] = self._compress_formed(
                    layer, flatten_layer(self.model, layer, grads2).detach())
            del grads2
        exact_needed = []
        for layer in self.layers:
            tol = _tolerance(params[layer.param_names[0]].dtype)
            want = batch_sketch[layer.name]
            if layer.kind == "flat":
                exact_needed.append(layer)
                continue
            first = self.route[layer.name]
            failures = []
            chosen = None
            for layout in [first] + [lo for lo in LAYOUTS if lo != first]:
                S = self._hooked_sketch(layer, calls[layer.name], grads, B, layout)
                if S is None:
                    continue
                _check_finite(S, layer.name)
                rms = float(S.double().norm()) / max(1, B) ** 0.5
                e_sum = _rel_err(S.sum(0), want, floor=rms)
                e_ex = max((_rel_err(S[i], ref[layer.name][i]) for i in range(m)), default=0.0)
                if e_sum <= tol and e_ex <= tol:
                    chosen = layout
                    if bool((S != 0).any()):
                        self.zero[layer.name] = False
                    break
                failures.append(f"{layout}: sum rel. err {e_sum:.2g}, per-example {e_ex:.2g}")
            if chosen is not None:
                self.route[layer.name] = chosen
                continue
            self.route[layer.name] = EXACT
            seen = len(calls.get(layer.name, []))
            why = ("no F.linear/F.conv call with this weight was seen" if seen == 0
                   else "; ".join(failures) or "its inputs fit no batch layout")
            note = (f"{MOVED_NOTE} ({why}); captured exactly from torch.func per-example "
                    "gradients instead (slower)")
            self.notes[layer.name].append(note)
            exact_needed.append(layer)
        # the exact route must itself add up to the batch gradient (a loss whose examples
        # depend on each other, e.g. BatchNorm in train mode, has no per-example gradient)
        if exact_needed:
            sk = self._exact_sketches(batch, loss_fn, exact_needed)
            for layer in exact_needed:
                S = sk[layer.name]
                _check_finite(S, layer.name)
                tol = _tolerance(params[layer.param_names[0]].dtype)
                rms = float(S.double().norm()) / max(1, B) ** 0.5
                err = _rel_err(S.sum(0), batch_sketch[layer.name], floor=rms)
                if err > tol:
                    self.failed[layer.name] = (
                        f"layer {layer.name} cannot be captured exactly: its per-example "
                        f"gradients do not add up to the batch gradient (rel. err {err:.2g}), so "
                        "one example's loss depends on other examples of the batch (BatchNorm "
                        "in train mode? in-batch negatives?). Exclude it with "
                        f"{option('layers', _glob(layer))} or make the loss per-example")
                    continue
                if bool((S != 0).any()):
                    self.zero[layer.name] = False
        for layer in self.layers:
            if layer.name in self.failed:
                continue
            for note in self.notes[layer.name]:  # the route changes that stand
                log.warning("layer %s: %s", layer.name, note)
            if self.zero[layer.name]:
                note = (f"zero gradient for every one of the {n} examples checked: the loss "
                        "may not reach this layer (the build reports the layers whose "
                        "gradient is zero for every training example)")
                self.notes[layer.name].append(note)
                log.warning("layer %s: %s", layer.name, note)
        self.checked = True
        if self.failed and strict:
            first, *more = self.failed
            extra = (f" (also: {', '.join(more)}: exclude with "
                     + " ".join(option("layers", self.exclude_glob(x)) for x in more) + ")"
                     if more else "")
            raise CaptureError(self.failed[first] + extra, layer=first)
        return {layer.name: _ROUTE_TEXT[self.route[layer.name]] for layer in self.layers}

    def exclude_glob(self, name: str) -> str:
        """The --layers pattern that removes layer ``name``."""
        return _glob(next(layer for layer in self.layers if layer.name == name))

    def check_report(self) -> list[dict]:
        """One row per layer after ``check``: layer, kind, route ("factored", "flat",
        "moved-to-flat" when the check moved a factored layer to torch.func, "none" when no
        route is exact), status ("ok",
        "zero-gradient" or "failed"), note, and for a failed layer the glob excluding it."""
        rows = []
        for layer in self.layers:
            moved = layer.kind != "flat" and self.route[layer.name] == EXACT
            route = "moved-to-flat" if moved else ("flat" if layer.kind == "flat" else "factored")
            failed = getattr(self, "failed", {}).get(layer.name)
            if failed:
                route = "none"
            status = "failed" if failed else ("zero-gradient" if self.zero[layer.name] else "ok")
            row = dict(layer=layer.name, kind=layer.kind, route=route,
                       capture=_ROUTE_TEXT[self.route[layer.name]], status=status,
                       note=failed or "; ".join(self.notes[layer.name]))
            if failed:
                row["exclude"] = f"--layers '{_glob(layer)}'"
            rows.append(row)
        return rows


def _check_finite(s: torch.Tensor, layer: str, what: str = "gradient sketch"):
    """NaN/inf would silently poison F and every score; name the example and the layer."""
    bad = ~torch.isfinite(s).all(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise CaptureError(
            f"non-finite (NaN/inf) {what} for example {i} of the batch in layer {layer}; check the "
            f"loss and the inputs of that example (e.g. log(0), overflow in half precision)",
            example=i, layer=layer)
