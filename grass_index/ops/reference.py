"""Pure-torch kernels: the fallback for any device without a native kernel, and the
reference the native kernels are tested against."""
import torch

from . import checks
from .library import lib


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types accumulate in float32 so sums over many coordinates keep precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sjlt_reference(x: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    checks.check_sjlt_meta(x, idx, sign, k)
    checks.check_sjlt_values(idx, sign, k)
    d = x.shape[-1]
    s = idx.shape[0] if idx.dim() == 2 else 1  # explicit: reshape(-1, 0) is ambiguous
    acc = accumulation_dtype(x.dtype)
    n_rows = x.shape[:-1].numel()
    rows = x.reshape(n_rows, d).to(acc)
    out = rows.new_zeros(n_rows, k)
    for r_idx, r_sign in zip(idx.reshape(s, d), sign.reshape(s, d)):
        out.index_add_(1, r_idx, rows * r_sign.to(acc))
    return out.to(x.dtype).reshape(*x.shape[:-1], k)


def mask_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    checks.check_mask_meta(x, idx)
    checks.check_mask_values(x, idx)
    return x.index_select(-1, idx).contiguous()


lib.impl("sjlt", sjlt_reference, "CompositeExplicitAutograd")
lib.impl("mask", mask_reference, "CompositeExplicitAutograd")
