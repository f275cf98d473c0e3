"""Input validation shared by the reference and fake kernels.

Metadata checks (dtype, shape) run everywhere, fake tensors included; value checks
(index range, sign values) only where data exists. The C++ kernels raise the same
messages so errors read the same with or without the native build.
"""
import weakref

import torch

from .errors import OpInputError
from .library import FLOAT_DTYPES, SIGN_DTYPES

# Index buffers whose values were already checked: {id(idx): (weakref to idx, its version,
# weakref to sign, sign version, bound)}. Value checks read the data on the host, a blocking
# sync on a GPU; a compressor passes the same buffers on every call, so each is checked once
# (again after an in-place change). Weak references: a freed buffer's id may be reused.
_CHECKED: dict[int, tuple] = {}


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter; None for tensors without one (inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _already_checked(idx: torch.Tensor, sign, bound: int) -> bool:
    if _version(idx) is None or (sign is not None and _version(sign) is None):
        return False
    hit = _CHECKED.get(id(idx))
    return (hit is not None and hit[0]() is idx and hit[1] == idx._version and hit[4] == bound
            and (sign is None or (hit[2] is not None and hit[2]() is sign
                                  and hit[3] == sign._version)))


def _mark_checked(idx: torch.Tensor, sign, bound: int) -> None:
    if _version(idx) is None or (sign is not None and _version(sign) is None):
        return
    if len(_CHECKED) > 1024:  # drop entries of freed buffers
        for key in [k for k, v in _CHECKED.items() if v[0]() is None]:
            del _CHECKED[key]
    _CHECKED[id(idx)] = (weakref.ref(idx), idx._version,
                         None if sign is None else weakref.ref(sign),
                         None if sign is None else sign._version, bound)


def _fail(msg: str):
    raise OpInputError(msg)


def check_x(op: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        _fail(f"grass_index.{op}: x has dtype {x.dtype}; expected float32, float16, bfloat16 or float64. "
              "Cast the input with x.float().")
    if x.dim() < 1:
        _fail(f"grass_index.{op}: x must have at least one dimension (the feature dim), got a scalar.")


def check_index(op: str, idx: torch.Tensor, what: str = "idx") -> None:
    if idx.dtype != torch.int64:
        _fail(f"grass_index.{op}: {what} has dtype {idx.dtype}; expected int64 (torch.long). Use {what}.long().")
    if idx.device.type != "meta" and idx.is_floating_point():
        _fail(f"grass_index.{op}: {what} must be integer")


def check_sjlt_meta(x: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k) -> None:
    check_x("sjlt", x)
    check_index("sjlt", idx)
    if idx.dim() not in (1, 2):
        _fail(f"grass_index.sjlt: idx must be [d] or [s, d], got shape {tuple(idx.shape)}.")
    if sign.dtype not in SIGN_DTYPES:
        _fail(f"grass_index.sjlt: sign has dtype {sign.dtype}; expected an integer or float tensor of +-1.")
    if tuple(sign.shape) != tuple(idx.shape):
        _fail(f"grass_index.sjlt: sign shape {tuple(sign.shape)} must equal idx shape {tuple(idx.shape)}.")
    torch._check(
        x.shape[-1] == idx.shape[-1],
        lambda: f"grass_index.sjlt: x has {x.shape[-1]} features but idx has {idx.shape[-1]} columns; "
        "they must match (idx maps each input coordinate to an output bucket).",
    )
    torch._check(k >= 1, lambda: f"grass_index.sjlt: k must be >= 1, got {k}.")
    if idx.device != x.device or sign.device != x.device:
        _fail(f"grass_index.sjlt: x ({x.device}), idx ({idx.device}) and sign ({sign.device}) must be on "
              "the same device.")


def check_sjlt_values(idx: torch.Tensor, sign: torch.Tensor, k: int) -> None:
    if idx.numel() == 0:
        return
    if _already_checked(idx, sign, k):
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= k:
        _fail(f"grass_index.sjlt: idx values must lie in [0, k={k}), found range [{lo}, {hi}].")
    if not bool(((sign == 1) | (sign == -1)).all()):
        _fail("grass_index.sjlt: sign entries must be +1 or -1.")
    _mark_checked(idx, sign, k)


def check_mask_meta(x: torch.Tensor, idx: torch.Tensor) -> None:
    check_x("mask", x)
    check_index("mask", idx)
    if idx.dim() != 1:
        _fail(f"grass_index.mask: idx must be 1-D [k'], got shape {tuple(idx.shape)}.")
    if idx.device != x.device:
        _fail(f"grass_index.mask: x ({x.device}) and idx ({idx.device}) must be on the same device.")


def check_mask_values(x: torch.Tensor, idx: torch.Tensor) -> None:
    if idx.numel() == 0:
        return
    d = x.shape[-1]
    if _already_checked(idx, None, d):
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= d:
        _fail(f"grass_index.mask: idx values must lie in [0, d={d}), found range [{lo}, {hi}].")
    _mark_checked(idx, None, d)
