"""The compression custom ops: torch.ops.grass_index.sjlt and torch.ops.grass_index.mask.

Import order matters: schemas first, then the fallback/fake/autograd registrations, then
the native extension (which only adds backend kernels for the existing schemas).
"""
import torch

from . import library  # noqa: F401  (defines the schemas)
from . import autograd, fake, reference  # noqa: F401  (registrations)
from . import native
from .native import native_status  # noqa: F401

native.load()


def sjlt(x: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """Sparse JL scatter: out[..., idx[r, j]] += sign[r, j] * x[..., j], summed over rows r of
    idx/sign ([d] or [s, d]). No scaling: callers divide by sqrt(s) where they want it."""
    return torch.ops.grass_index.sjlt.default(x, idx, sign, k)


def mask(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Coordinate gather: x[..., idx] with an int64 index (static output size)."""
    return torch.ops.grass_index.mask.default(x, idx)


__all__ = ["sjlt", "mask", "native_status"]
