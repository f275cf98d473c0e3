"""Build one flat stage (a Transform on [..., d]) from a Spec, applying the dim rules.

Dim rules: a stage asking for more dims than its input has raises (clamp=False) or becomes
Identity (clamp=True, also when equal), with a note, so default specs work on tiny MLPs and
big transformers alike.
"""
from __future__ import annotations


import torch

from .base import Chain, Identity, Transform
from .dense import Gaussian, Rademacher
from .hadamard import FJLT
from .masks import RandomMask, SelectiveMask
from .sparse import SJLT
from .spec import GRASS_MASK_RATIO, Spec
from .errors import CompressError


def _too_big(where: str, spec: Spec, k: int, d: int):
    raise CompressError(
        f"{where}: spec '{spec}' asks for {k} dims but the input dim is only {d}. Use a dim <= {d}, "
        "or pass clamp=True to keep this stage exact (identity) instead."
    )


def check_selective_indices(where: str, idx, d: int, k: int) -> torch.Tensor:
    """Validate learned mask indices against the layer dim d and the spec dim k."""
    if idx is None:
        raise CompressError(f"{where}: selective_mask needs indices: pass mask_indices (e.g. "
                         "load_selective_mask(path)[layer_name]).")
    idx = torch.as_tensor(idx)
    if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise CompressError(f"{where}: selective mask indices must be a 1-D integer tensor, got "
                         f"dtype {idx.dtype} shape {tuple(idx.shape)}.")
    if idx.numel() != k:
        raise CompressError(f"{where}: the spec asks for {k} coordinates but the mask file has "
                         f"{idx.numel()}; make the spec dim match the mask (selective_mask-{idx.numel()}).")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
        raise CompressError(f"{where}: selective mask indices must lie in [0, {d}) for this layer, found "
                         f"[{int(idx.min())}, {int(idx.max())}]; was the mask made for another model?")
    if torch.unique(idx).numel() != idx.numel():
        raise CompressError(f"{where}: selective mask indices contain duplicates; each coordinate may be "
                         "kept once.")
    return idx.long()


def build_stage(spec: Spec, d: int, gen: torch.Generator, *, clamp: bool, where: str,
                notes: list[str], indices=None) -> Transform:
    """The Transform for a flat spec on input dim d (appends clamp notes to ``notes``)."""
    assert not spec.factored
    if spec.kind == "identity":
        if spec.dims and spec.dims[0] != d and not (clamp and spec.dims[0] > d):
            raise CompressError(f"{where}: 'identity-{spec.dims[0]}' keeps every coordinate, so its dim "
                             f"must equal the input dim {d}. Write 'identity' or 'identity-{d}'.")
        return Identity(d)
    k = spec.dims[0]
    if k >= d and (clamp or k > d):
        if not clamp:
            _too_big(where, spec, k, d)
        notes.append(f"{where}: {spec} >= input dim {d}; using identity (exact, no compression)")
        return Identity(d)
    if spec.kind == "normal":
        return Gaussian(d, k, gen)
    if spec.kind == "rademacher":
        return Rademacher(d, k, gen)
    if spec.kind == "sjlt":
        return SJLT(d, k, gen, s=spec.s)
    if spec.kind == "fjlt":
        return FJLT(d, k, gen)
    if spec.kind == "random_mask":
        return RandomMask(d, k, gen)
    if spec.kind == "selective_mask":
        return SelectiveMask(d, check_selective_indices(where, indices, d, k))
    if spec.kind == "grass":
        return _grass(spec, d, k, gen, clamp=clamp, where=where, notes=notes)
    raise CompressError(f"{where}: unsupported kind {spec.kind!r}")  # parse_spec already rejects these


def _grass(spec: Spec, d: int, k: int, gen, *, clamp: bool, where: str, notes: list[str]) -> Transform:
    kp = spec.mask if spec.mask is not None else min(d, GRASS_MASK_RATIO * k)
    if kp > d:
        if not clamp:
            raise CompressError(f"{where}: spec '{spec}' asks for a mask of {kp} coordinates but the input dim "
                             f"is only {d}. Use mask<={d}, or clamp=True.")
        notes.append(f"{where}: grass mask {kp} >= input dim {d}; mask stage is identity")
    mask = RandomMask(d, kp, gen) if kp < d else Identity(d)
    return Chain(mask, SJLT(mask.k, k, gen, s=spec.s), str(Spec("grass", (k,), spec.s, kp)))
