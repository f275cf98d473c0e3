"""Seeds: every layer and every stage draws its own projection from a CPU generator.

Why CPU: torch's CPU generator gives the same stream on every machine, so the same spec +
seed gives the same projection everywhere; buffers are then moved with ``.to(device)``.
"""
from __future__ import annotations


import numbers
import zlib

import torch

from .errors import CompressError


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, stable across processes and machines (crc32, not Python's salted hash)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise CompressError(f"seed must be an int, got {type(seed).__name__}")
    return zlib.crc32(f"{int(seed)}:{name}".encode("utf-8")) & 0x7FFFFFFF


def generator(seed: int, stage: str) -> torch.Generator:
    """A fresh CPU generator for one stage ('sparsify', 'sparsify.in', 'project', ...)."""
    return torch.Generator(device="cpu").manual_seed(layer_seed(seed, stage))
