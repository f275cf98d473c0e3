"""The three named compressors of the GraSS paper, as classes whose defaults are the paper's
specs (FactGraSS: random_mask-128*128 then sjlt-4096; see each class)."""
from __future__ import annotations

from .factored import FactoredCompressor
from .factory import build_factored, build_flat
from .flat import FlatCompressor


class FactGraSS(FactoredCompressor):
    """Mask both factors (a gather), batched outer-product sum over tokens, flatten, SJLT."""

    def __init__(self, d_in: int, d_out: int, sparsification: str = "random_mask-128*128",
                 projection: str = "sjlt-4096", seed: int = 0, *, clamp: bool = False,
                 mask_indices: dict | None = None, name: str | None = None):
        b = build_factored(sparsification, projection, d_in, d_out, seed=seed, clamp=clamp,
                           mask_indices=mask_indices, name=name)
        super().__init__(b.compress_in, b.compress_out, b.project, b.notes)


class LoGra(FactoredCompressor):
    """Dense Gaussian projection of each factor, outer-product sum; no further projection."""

    def __init__(self, d_in: int, d_out: int, sparsification: str = "normal-64*64",
                 projection: str = "identity", seed: int = 0, *, clamp: bool = False,
                 mask_indices: dict | None = None, name: str | None = None):
        b = build_factored(sparsification, projection, d_in, d_out, seed=seed, clamp=clamp,
                           mask_indices=mask_indices, name=name)
        super().__init__(b.compress_in, b.compress_out, b.project, b.notes)


class GraSS(FlatCompressor):
    """Any parameter: random mask of the flat per-sample gradient, then SJLT."""

    def __init__(self, d: int, sparsification: str = "random_mask-16384", projection: str = "sjlt-4096",
                 seed: int = 0, *, clamp: bool = False, mask_indices: dict | None = None,
                 name: str | None = None):
        b = build_flat(sparsification, projection, d, seed=seed, clamp=clamp, mask_indices=mask_indices,
                       name=name)
        super().__init__(b.sparsify, b.project, b.notes)
