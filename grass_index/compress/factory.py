"""make_compressor: one entry point from (sparsification, projection, layer shape) to a module.

    flat parameter (d=...)            -> FlatCompressor          forward(g [B, d])
    linear layer, factored 'T-A*B'    -> FactoredCompressor      forward(x, grad_out)
    linear layer, flat sparsification -> MaterializedLinearCompressor (forms G_b; slower)

A = dim for d_in (the x side), B = dim for d_out (the grad side). Each stage draws from its
own CPU generator seeded by layer_seed(seed, stage), so the result is the same on any machine.
"""
from __future__ import annotations


from torch import nn

from .factored import FactoredCompressor, MaterializedLinearCompressor
from .flat import FlatCompressor
from .seeding import generator
from .spec import Spec, parse_spec
from .stages import build_stage
from .errors import CompressError


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CompressError(f"{name} must be a positive int, got {v!r}")
    return v


def _selective(spec: Spec, mask_indices, key: str):
    if spec.kind != "selective_mask":
        return None
    if not isinstance(mask_indices, dict) or key not in mask_indices:
        have = sorted(mask_indices) if isinstance(mask_indices, dict) else None
        raise CompressError(f"selective_mask '{spec}' needs mask_indices with key {key!r} (got keys {have}); "
                         "pass load_selective_mask(path)[layer_name]. Factored specs use "
                         "{'in': ..., 'out': ...}, flat ones {'flat': ...}.")
    return mask_indices[key]


def build_flat(sparsification, projection, d: int, *, seed=0, clamp=False, mask_indices=None,
               name=None) -> FlatCompressor:
    sp, pr = parse_spec(sparsification), parse_spec(projection)
    where, d = name or "layer", _positive("d", d)
    if sp.factored:
        raise CompressError(f"{where}: factored spec A*B ('{sp}') needs a linear layer (pass d_in and d_out); "
                         f"for a flat parameter of {d} values use a flat spec such as "
                         f"'{sp.kind}-{sp.dims[0] * sp.dims[1]}'.")
    _check_projection(pr, where)
    if sp.kind == "selective_mask" and pr.kind == "selective_mask":
        raise CompressError(f"{where}: only one stage may be selective_mask; set the projection to e.g. 'sjlt-4096'.")
    notes: list[str] = []
    s = build_stage(sp, d, generator(seed, "sparsify"), clamp=clamp, notes=notes,
                    where=f"{where} sparsification", indices=_selective(sp, mask_indices, "flat"))
    p = build_stage(pr, s.k, generator(seed, "project"), clamp=clamp, notes=notes,
                    where=f"{where} projection", indices=_selective(pr, mask_indices, "flat"))
    return FlatCompressor(s, p, notes)


def build_factored(sparsification, projection, d_in: int, d_out: int, *, seed=0, clamp=False,
                   mask_indices=None, name=None) -> FactoredCompressor:
    sp, pr = parse_spec(sparsification), parse_spec(projection)
    where, d_in, d_out = name or "layer", _positive("d_in", d_in), _positive("d_out", d_out)
    if not sp.factored:
        raise CompressError(f"{where}: '{sp}' is not factored; a factored compressor needs 'TYPE-A*B' "
                         "(A for d_in, B for d_out), e.g. 'random_mask-128*128'.")
    _check_projection(pr, where)
    if pr.kind == "selective_mask":
        raise CompressError(f"{where}: a selective_mask projection after a factored sparsification is not "
                         "supported; use e.g. 'sjlt-4096' or 'identity'.")
    notes: list[str] = []
    a, b = sp.dims
    cin = build_stage(Spec(sp.kind, (a,), sp.s), d_in, generator(seed, "sparsify.in"), clamp=clamp,
                      notes=notes, where=f"{where} sparsification (d_in={d_in}, spec dim {a})",
                      indices=_selective(sp, mask_indices, "in"))
    cout = build_stage(Spec(sp.kind, (b,), sp.s), d_out, generator(seed, "sparsify.out"), clamp=clamp,
                       notes=notes, where=f"{where} sparsification (d_out={d_out}, spec dim {b})",
                       indices=_selective(sp, mask_indices, "out"))
    p = build_stage(pr, cin.k * cout.k, generator(seed, "project"), clamp=clamp, notes=notes,
                    where=f"{where} projection")
    return FactoredCompressor(cin, cout, p, notes)


def _check_projection(pr: Spec, where: str) -> None:
    if pr.factored:
        raise CompressError(f"{where}: the projection must be flat ('TYPE-K'), got factored '{pr}'. Put the "
                         "A*B spec in the sparsification, e.g. sparsification='random_mask-128*128', "
                         "projection='sjlt-4096'.")


def make_compressor(sparsification: str, projection: str, *, d: int | None = None,
                    d_in: int | None = None, d_out: int | None = None, seed: int = 0,
                    clamp: bool = False, mask_indices: dict | None = None,
                    name: str | None = None) -> nn.Module:
    """Build the compressor for one parameter: give ``d`` (flat) or ``d_in`` and ``d_out`` (linear).

    ``d_in`` already includes a bias column if the caller appends ones to x. ``name`` only
    improves error messages; pass ``seed=layer_seed(seed, name)`` for a per-layer projection.
    """
    if d is not None:
        if d_in is not None or d_out is not None:
            raise CompressError("pass either d (flat parameter) or d_in and d_out (linear layer), not both")
        return build_flat(sparsification, projection, _positive("d", d), seed=seed, clamp=clamp,
                          mask_indices=mask_indices, name=name)
    if d_in is None or d_out is None:
        raise CompressError("make_compressor needs the parameter shape: d=... for a flat parameter, or "
                         "d_in=... and d_out=... for a linear layer")
    d_in, d_out = _positive("d_in", d_in), _positive("d_out", d_out)
    if parse_spec(sparsification).factored:
        return build_factored(sparsification, projection, d_in, d_out, seed=seed, clamp=clamp,
                              mask_indices=mask_indices, name=name)
    flat = build_flat(sparsification, projection, d_in * d_out, seed=seed, clamp=clamp,
                      mask_indices=mask_indices, name=name)
    return MaterializedLinearCompressor(d_in, d_out, flat)
