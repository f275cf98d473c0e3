"""The op schemas, defined once for every backend (torchao's pattern).

Sizes are SymInt so one compiled graph serves every k and batch size. The C++/CUDA
extension only adds TORCH_LIBRARY_IMPL kernels for these schemas; the pure-torch
reference in reference.py is registered as CompositeExplicitAutograd and is what runs
when no native kernel exists for a device (backend kernels take precedence).
"""
import torch

NAMESPACE = "grass_index"

lib = torch.library.Library(NAMESPACE, "DEF")
lib.define("sjlt(Tensor x, Tensor idx, Tensor sign, SymInt k) -> Tensor")
lib.define("mask(Tensor x, Tensor idx) -> Tensor")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SIGN_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64) + FLOAT_DTYPES
