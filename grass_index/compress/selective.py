"""Selective-mask files: learned coordinates per layer, produced by a later training tool.

File format (``torch.save``, loaded with ``weights_only=True``)::

    {"format": "grass_index.selective_mask", "version": 1,
     "layers": {layer_name: {"in": LongTensor[k_in'], "out": LongTensor[k_out']}   # linear layer
                          | {"flat": LongTensor[k']}}}                             # any parameter

Indices are 0-based positions along d_in / d_out (or the row-major flattened parameter),
unique, and in the order the sketch should keep them. Use ``save_selective_mask`` to write.
"""
from __future__ import annotations


import os

import torch

from .errors import CompressError

FORMAT, VERSION = "grass_index.selective_mask", 1


def _check_layers(layers, where: str) -> dict:
    if not isinstance(layers, dict):
        raise CompressError(f"{where}: 'layers' must be a dict layer_name -> {{'in','out'}} or {{'flat'}}")
    out = {}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not (set(entry) == {"flat"} or set(entry) == {"in", "out"}):
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise CompressError(f"{where}: layer {name!r} must map to {{'in': idx, 'out': idx}} (linear) or "
                             f"{{'flat': idx}}, got {keys}.")
        fixed = {}
        for key, idx in entry.items():
            idx = torch.as_tensor(idx)
            if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
                raise CompressError(f"{where}: layer {name!r} {key!r} indices must be a 1-D integer tensor, "
                                 f"got dtype {idx.dtype} shape {tuple(idx.shape)}.")
            fixed[key] = idx.long()
        out[str(name)] = fixed
    return out


def save_selective_mask(path: str | os.PathLike, layers: dict) -> None:
    """Write learned mask indices in the format load_selective_mask reads."""
    layers = _check_layers(layers, str(path))
    from ..fileio import atomic_save  # a reader never sees half a mask file

    atomic_save(path, lambda f: torch.save({"format": FORMAT, "version": VERSION,
                                            "layers": layers}, f))


def load_selective_mask(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read a mask file -> {layer_name: {"in": idx, "out": idx} or {"flat": idx}}."""
    if not os.path.exists(path):
        raise CompressError(f"selective mask file {str(path)!r} does not exist; train one first or fix the path.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure means: not our file)
        raise CompressError(f"{path}: not a selective mask file ({type(e).__name__}: {e}).") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CompressError(f"{path}: not a selective mask file (expected a dict with format={FORMAT!r}); "
                         "write it with grass_index.compress.save_selective_mask.")
    if obj.get("version") != VERSION:
        raise CompressError(f"{path}: selective mask format version {obj.get('version')!r} is not supported "
                         f"(this grass_index reads version {VERSION}).")
    return _check_layers(obj.get("layers"), str(path))
