"""Which parameters are attributed, and how: a "linear" layer (weight + optional bias of an
nn.Linear / HF Conv1D, captured by hooks without forming the gradient) or a "flat" layer
(any other parameter, per-sample gradient via torch.func)."""
from __future__ import annotations

import fnmatch
import logging
import sys
from dataclasses import dataclass, field

from torch import nn

from .errors import CaptureError

log = logging.getLogger(__name__)


@dataclass
class LayerInfo:
    """One attributed layer. Linear layers flatten their gradient as [d_out, d_in] row-major,
    with the bias as an extra last input column (d_in excludes it; see ``d_in_eff``)."""

    name: str
    kind: str  # "linear" | "flat"
    module_name: str | None
    param_names: list[str]
    d_in: int | None
    d_out: int | None
    has_bias: bool
    numel: int
    # every module that computes y = W x with this weight (weight sharing); set for linear
    module_names: list[str] = field(default_factory=list)

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


def _linear_candidates(model, canon, params, owners):
    """Group linear modules by weight: {weight name: (module names, bias name|None, d_in, d_out)}.

    The entry is None when the weight is also used outside linear modules of the same shape
    and bias (e.g. an LM head tied to an embedding): hooks would see only part of its
    gradient, so such a weight can only be captured exactly as a flat layer.
    """
    groups: dict[str, tuple | None] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        dims = linear_dims(mod)
        w = getattr(mod, "weight", None)
        if dims is None or not isinstance(w, nn.Parameter):
            continue
        wname = canon[id(w)]
        b = getattr(mod, "bias", None)
        bname = canon[id(b)] if isinstance(b, nn.Parameter) else None
        if wname not in groups:
            groups[wname] = ([mname], bname, dims[0], dims[1])
        elif groups[wname] is not None:
            names, bname0, d_in, d_out = groups[wname]
            if bname0 != bname or (d_in, d_out) != dims[:2]:
                groups[wname] = None
            elif mname not in names:
                names.append(mname)
    for wname, entry in groups.items():
        if entry is None:
            continue
        names, bname, d_in, d_out = entry
        if any(m not in names or a != "weight" for _, m, a in owners[id(params[wname])]):
            groups[wname] = None
        elif bname is not None and any(
                m not in names or a != "bias" for _, m, a in owners[id(params[bname])]):
            groups[wname] = (names, None, d_in, d_out)  # a bias shared elsewhere stays flat
    return groups


def select_layers(model: nn.Module, patterns: list[str] | None = None) -> list[LayerInfo]:
    """Resolve the parameters to attribute, in model order.

    patterns None: every nn.Linear / Conv1D with a trainable weight becomes a linear layer
    (its bias included when trainable). Otherwise ``patterns`` are fnmatch globs on
    ``model.named_parameters()`` names: a matched linear weight gives a linear layer (bias iff
    it matches too); any other matched parameter a flat layer.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    canon, params, aliases, owners = _param_index(model)
    if not params:
        raise CaptureError("the model has no parameters to attribute")
    groups = _linear_candidates(model, canon, params, owners)

    if patterns is None:
        chosen = {n for n, p in params.items() if p.requires_grad and groups.get(n)}
        for n, entry in groups.items():
            if entry is None and params[n].requires_grad:
                log.warning("not capturing %s by default: the weight is shared with a non-linear "
                            "use (e.g. a tied embedding); select it with --layers to capture it "
                            "exactly as a flat layer", n)
        selected = chosen | {groups[n][1] for n in chosen
                             if groups[n][1] is not None and params[groups[n][1]].requires_grad}
        if not chosen:
            raise CaptureError(
                "the model has no trainable nn.Linear/Conv1D layer to capture by default; "
                "choose parameters with --layers (e.g. --layers '*')")
    else:
        if not patterns:
            raise CaptureError("empty --layers list; pass at least one glob such as 'fc1.*'")
        selected = set()
        for pat in patterns:
            hits = [c for a, c in aliases.items() if fnmatch.fnmatchcase(a, pat)]
            if not hits:
                sample = ", ".join(list(params)[:12]) + (", ..." if len(params) > 12 else "")
                raise CaptureError(
                    f"--layers pattern {pat!r} matches no parameter; patterns are globs on "
                    f"parameter names, e.g. {sample}")
            selected.update(hits)

    layers: list[LayerInfo] = []
    used: set[str] = set()
    for name, p in params.items():
        if name not in selected or name in used:
            continue
        entry = groups.get(name)
        if entry:
            mnames, bname, d_in, d_out = entry
            has_bias = bname is not None and bname in selected and bname not in used
            pnames = [name] + ([bname] if has_bias else [])
            used.update(pnames)
            layers.append(LayerInfo(
                name=mnames[0], kind="linear", module_name=mnames[0], param_names=pnames,
                d_in=d_in, d_out=d_out, has_bias=has_bias,
                numel=d_out * (d_in + int(has_bias)), module_names=list(mnames)))
        else:
            used.add(name)
            layers.append(LayerInfo(name=name, kind="flat", module_name=None, param_names=[name],
                                    d_in=None, d_out=None, has_bias=False, numel=p.numel()))
    # a bias selected without its weight becomes a flat layer (the weight branch never claims it)
    return layers
