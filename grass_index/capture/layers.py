"""Which parameters are attributed, and how: a "linear" layer (weight + optional bias of an
nn.Linear / HF Conv1D / nn.MultiheadAttention's packed in-projection), a "conv" layer
(nn.Conv1d / nn.Conv2d, factored over output positions), both captured from the layer's
input and output gradient without forming the weight gradient, or a "flat" layer (any other
parameter, per-sample gradient via torch.func).

Patterns are fnmatch globs on parameter names; a pattern starting with "!" removes the
parameters it matches (from the default selection when no other pattern is given)."""
from __future__ import annotations

import fnmatch
import logging
import sys
from dataclasses import dataclass, field

from torch import nn

from ..errors import option
from .errors import CaptureError

log = logging.getLogger(__name__)


@dataclass
class LayerInfo:
    """One attributed layer. Linear layers flatten their gradient as [d_out, d_in] row-major,
    with the bias as an extra last input column (d_in excludes it; see ``d_in_eff``)."""

    name: str
    kind: str  # "linear" | "conv" | "flat"
    module_name: str | None
    param_names: list[str]
    d_in: int | None
    d_out: int | None
    has_bias: bool
    numel: int
    # every module that computes y = W x with this weight (weight sharing); set for linear
    module_names: list[str] = field(default_factory=list)
    # conv: the weight is `groups` independent [d_out, d_in] blocks (d_out = C_out/groups,
    # d_in = C_in/groups * kernel size); its sketch is the concatenation of their sketches
    groups: int = 1

    @property
    def d_in_eff(self) -> int | None:
        """Input width seen by the compressor: d_in plus the ones column for the bias."""
        return None if self.d_in is None else self.d_in + int(self.has_bias)


def _conv1d_type():
    """HF GPT-2's Conv1D (y = x W + b, W of shape [d_in, d_out]); only if transformers is
    already loaded, since importing it is slow and a model using Conv1D has loaded it."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(d_in, d_out, transposed) for nn.Linear / Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out), True
    return None


def factored_dims(module: nn.Module) -> list[tuple[str, str, str, int, int, int]] | None:
    """How a module's weight factors into (input, output gradient) pairs:
    [(weight attr, bias attr, kind, d_in, d_out, groups)], or None when it does not."""
    dims = linear_dims(module)
    if dims is not None:
        return [("weight", "bias", "linear", dims[0], dims[1], 1)]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        g = int(module.groups)
        k = 1
        for s in module.kernel_size:
            k *= int(s)
        return [("weight", "bias", "conv", module.in_channels // g * k, module.out_channels // g, g)]
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim \
            and isinstance(module.in_proj_weight, nn.Parameter):
        e = int(module.embed_dim)
        return [("in_proj_weight", "in_proj_bias", "linear", e, 3 * e, 1)]
    return None


def _param_index(model: nn.Module):
    """Canonical name per parameter (first name in named_parameters, so tied weights count
    once), every alias -> canonical name, and per parameter the (module, module_name,
    attribute) places that hold it."""
    canon: dict[int, str] = {}
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        canon[id(p)] = name
        params[name] = p
    aliases = {name: canon[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append((mod, mname, attr))
    return canon, params, aliases, owners


def _factored_candidates(model, canon, params, owners):
    """Group factorable modules by weight:
    {weight name: (module names, bias name|None, kind, d_in, d_out, groups) | None}.

    The entry is None when the weight is also used outside modules of the same shape and
    bias (e.g. an LM head tied to an embedding): the factored capture would see only part of
    its gradient, so such a weight can only be captured exactly as a flat layer.
    """
    groups: dict[str, tuple | None] = {}
    attrs: dict[str, tuple[str, str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for wattr, battr, kind, d_in, d_out, ngroups in factored_dims(mod) or []:
            w = getattr(mod, wattr, None)
            if not isinstance(w, nn.Parameter):
                continue
            wname = canon[id(w)]
            b = getattr(mod, battr, None)
            bname = canon[id(b)] if isinstance(b, nn.Parameter) else None
            shape = (kind, d_in, d_out, ngroups)
            if wname not in groups:
                groups[wname] = ([mname], bname) + shape
                attrs[wname] = (wattr, battr)
            elif groups[wname] is not None:
                names, bname0 = groups[wname][:2]
                if groups[wname][2:] != shape or attrs[wname] != (wattr, battr):
                    groups[wname] = None
                    continue
                if mname not in names:
                    names.append(mname)
                if bname0 != bname:  # one weight, several biases: the biases stay flat
                    groups[wname] = (names, None) + shape
    for wname, entry in groups.items():
        if entry is None:
            continue
        names, bname = entry[:2]
        wattr, battr = attrs[wname]
        if any(m not in names or a != wattr for _, m, a in owners[id(params[wname])]):
            groups[wname] = None
        elif bname is not None and any(
                m not in names or a != battr for _, m, a in owners[id(params[bname])]):
            groups[wname] = (names, None) + entry[2:]  # a bias shared elsewhere stays flat
    return groups


def _default_selection(params, groups) -> set[str]:
    chosen = {n for n, p in params.items() if p.requires_grad and groups.get(n)}
    return chosen | {groups[n][1] for n in chosen
                     if groups[n][1] is not None and params[groups[n][1]].requires_grad}


def left_out(model: nn.Module, layers: list[LayerInfo]) -> dict[str, str]:
    """{trainable parameter not in ``layers``: why the default selection leaves it out}, so a
    build can say which gradients its scores ignore."""
    canon, params, _, owners = _param_index(model)
    groups = _factored_candidates(model, canon, params, owners)
    taken = {p for layer in layers for p in layer.param_names}
    out = {}
    for name, p in params.items():
        if not p.requires_grad or name in taken:
            continue
        if name in groups and groups[name] is None:
            out[name] = "weight shared with a non-linear use (e.g. a tied embedding)"
            continue
        if any(a in ("bias", "in_proj_bias") and factored_dims(m) for m, _, a in owners.get(id(p), [])):
            out[name] = ("bias of a weight shared by modules with different biases (or shared "
                         f"elsewhere); select it with {option('layers')} to capture it as a "
                         "flat layer")
            continue
        types = sorted({type(m).__name__ for m, _, _ in owners.get(id(p), [])})
        out[name] = f"{'/'.join(types) or 'bare'} parameter, not a Linear/Conv weight"
    return out


def select_layers(model: nn.Module, patterns: list[str] | None = None) -> list[LayerInfo]:
    """Resolve the parameters to attribute, in model order.

    patterns None: every nn.Linear / Conv1D / nn.Conv1d / nn.Conv2d and packed
    nn.MultiheadAttention in-projection with a trainable weight becomes a factored layer (its
    bias included when trainable). Otherwise ``patterns`` are fnmatch globs on
    ``model.named_parameters()`` names: a matched factorable weight gives a factored layer
    (bias iff it matches too); any other matched parameter a flat layer. Patterns starting
    with "!" remove what they match (from the default selection if nothing else is given).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    canon, params, aliases, owners = _param_index(model)
    if not params:
        raise CaptureError("the model has no parameters to attribute")
    groups = _factored_candidates(model, canon, params, owners)
    if patterns is not None and not patterns:
        raise CaptureError(f"empty {option('layers')} list; pass at least one glob such as "
                           "'fc1.*'")
    include = None if patterns is None else [p for p in patterns if not p.startswith("!")]
    exclude = [] if patterns is None else [p[1:] for p in patterns if p.startswith("!")]

    def hits(pat):
        found = [c for a, c in aliases.items() if fnmatch.fnmatchcase(a, pat)]
        if not found:
            sample = ", ".join(list(params)[:12]) + (", ..." if len(params) > 12 else "")
            raise CaptureError(
                f"{option('layers')} pattern {pat!r} matches no parameter; patterns are globs on "
                f"parameter names, e.g. {sample}")
        return found

    if not include:
        selected = _default_selection(params, groups)
        if not selected:
            raise CaptureError(
                "the model has no trainable nn.Linear/Conv1D/Conv layer to capture by default; "
                f"choose parameters with {option('layers')} (e.g. {option('layers', '*')})")
    else:
        selected = set()
        for pat in include:
            selected.update(hits(pat))
    for pat in exclude:
        selected.difference_update(hits(pat))
    if not selected:
        raise CaptureError(f"{option('layers')} {patterns} leaves no parameter to attribute")

    layers: list[LayerInfo] = []
    used: set[str] = set()
    for name, p in params.items():
        if name not in selected or name in used:
            continue
        entry = groups.get(name)
        if entry:
            mnames, bname, kind, d_in, d_out, ngroups = entry
            has_bias = bname is not None and bname in selected and bname not in used
            pnames = [name] + ([bname] if has_bias else [])
            used.update(pnames)
            layers.append(LayerInfo(
                name=mnames[0], kind=kind, module_name=mnames[0], param_names=pnames,
                d_in=d_in, d_out=d_out, has_bias=has_bias,
                numel=ngroups * d_out * (d_in + int(has_bias)), module_names=list(mnames),
                groups=ngroups))
        else:
            used.add(name)
            layers.append(LayerInfo(name=name, kind="flat", module_name=None, param_names=[name],
                                    d_in=None, d_out=None, has_bias=False, numel=p.numel()))
    # a bias selected without its weight becomes a flat layer (the weight branch never claims it)
    return layers
