"""Gradient compressors: the spec language, every transform, GraSS / FactGraSS / LoGra.

    from grass_index.compress import make_compressor, layer_seed
    c = make_compressor("random_mask-128*128", "sjlt-4096", d_in=768, d_out=3072,
                        seed=layer_seed(0, "h.0.mlp.c_fc"), clamp=True)
    sketch = c(x, grad_out)     # [B, 4096] float32; sum over tokens, G never formed

Every compressor is a buffer-only nn.Module (state_dict round-trips, .to(device) moves it),
linear in the gradient, deterministic given its seed, and compiles with fullgraph=True.
Outputs are float32 for float32/float16/bfloat16 inputs.
"""
from .base import Identity, Transform
from .errors import CompressError, SpecError
from .dense import Gaussian, Rademacher
from .factored import FactoredCompressor, MaterializedLinearCompressor
from .factory import make_compressor
from .flat import FlatCompressor
from .hadamard import FJLT, fwht
from .masks import RandomMask, SelectiveMask
from .named import FactGraSS, GraSS, LoGra
from .seeding import layer_seed
from .selective import load_selective_mask, save_selective_mask
from .sparse import SJLT
from .spec import KINDS, Spec, parse_spec

__all__ = [
    "CompressError", "SpecError", "Spec", "parse_spec", "KINDS", "make_compressor", "layer_seed", "load_selective_mask",
    "save_selective_mask", "FactGraSS", "LoGra", "GraSS", "FlatCompressor", "FactoredCompressor",
    "MaterializedLinearCompressor", "Transform", "Identity", "Gaussian", "Rademacher", "SJLT", "FJLT",
    "RandomMask", "SelectiveMask", "fwht",
]
