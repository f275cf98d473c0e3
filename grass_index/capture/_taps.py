"""From one recorded call (layer input x, output gradient Dy) to the per-example token pairs a
factored compressor sketches: Σ_t Dy_t x_tᵀ is the example's weight gradient.

Linear: the tokens are every position but the batch axis, which is either the first
("batch-first", [B, ..., d] or batch-major [B*T, d]) or the second ("sequence-first",
[T, B, d] or sequence-major [T*B, d], e.g. inside nn.MultiheadAttention). When T == B the
shapes cannot tell them apart; the sketcher's first-batch check decides.

Convolution: the tokens are the output positions, x_t the input patch that produced position
t (F.unfold), so C_in * kh * kw plays d_in; a grouped convolution is one block per group.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

LAYOUTS = ("batch_first", "seq_first")


def _float(dtype: torch.dtype) -> torch.dtype:
    """Half-precision activations go to the compressor as they are (it upcasts after its cheap
    first stage and accumulates in float32); anything else as float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def linear_tokens(x: torch.Tensor, g: torch.Tensor, B: int, layout: str):
    """([B, T, d_in], [B, T, d_out]) or None when x cannot have this layout."""
    if layout == "batch_first":
        if x.dim() < 2 or not (x.shape[0] == B or (x.dim() == 2 and x.shape[0] % B == 0)):
            return None
        return x.reshape(B, -1, x.shape[-1]), g.reshape(B, -1, g.shape[-1])
    if (x.dim() == 3 and x.shape[1] == B) or (x.dim() == 2 and x.shape[0] % B == 0):
        return (x.reshape(-1, B, x.shape[-1]).transpose(0, 1),
                g.reshape(-1, B, g.shape[-1]).transpose(0, 1))
    return None


def _pair(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


_EVERY: dict[tuple, torch.Tensor] = {}


def _input_mask(comp, groups: int):
    """(kept input coordinates, scale) when the compressor's input stage is a coordinate
    mask (random_mask / selective_mask) of a FactoredCompressor, else None."""
    from ..compress.base import Identity
    from ..compress.factored import FactoredCompressor
    from ..compress.masks import RandomMask, SelectiveMask

    stage = getattr(comp, "compress_in", None)
    if groups != 1 or not isinstance(comp, FactoredCompressor):
        return None
    if isinstance(stage, Identity):  # every coordinate: still cheaper than F.unfold's im2col
        return None, None
    if not isinstance(stage, (RandomMask, SelectiveMask)):
        return None
    scale = stage.scale if isinstance(stage, RandomMask) and stage.k != stage.d else None
    return stage.idx, scale


_PLANS: dict[tuple, tuple] = {}


def _patch_plan(idx: torch.Tensor, kernel: tuple, d_in: int):
    """For a mask over patch coordinates (c, i, j) (+ the bias coordinate d_in): the input
    channels it touches, and per kept coordinate its position among them, i and j, and
    whether it is the bias. Computed once per index buffer (torch.unique would sync a GPU)."""
    key = (id(idx), idx._version, idx.device, tuple(kernel), d_in)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is idx:
        return hit[1]
    kh, kw = kernel
    is_bias = idx == d_in
    real = idx.clamp(max=d_in - 1)
    chans, local = torch.unique(real // (kh * kw), return_inverse=True)
    rest = real % (kh * kw)
    plan = (chans, local, rest // kw, rest % kw, is_bias if bool(is_bias.any()) else None)
    if len(_PLANS) > 1024:
        _PLANS.clear()
    _PLANS[key] = (weakref.ref(idx), plan)
    return plan


def _masked_patches(x, kernel, dilation, padding, stride, idx, scale, d_in: int, out_hw):
    """[B, P, k] = the kept coordinates of every input patch (bias coordinate d_in = 1),
    read straight from the (padded) input with one gather: unfolding all C_in*kh*kw patch
    coordinates costs more than the convolution itself, and a mask keeps a few of them."""
    chans, local, ki, kj, is_bias = _patch_plan(idx, kernel, d_in)
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    xs = x.index_select(1, chans)
    if ph or pw:
        xs = F.pad(xs, (pw, pw, ph, ph))
    Ho, Wo = out_hw
    rows = ki[:, None] * dh + sh * torch.arange(Ho, device=x.device)[None]   # [k, Ho]
    cols = kj[:, None] * dw + sw * torch.arange(Wo, device=x.device)[None]   # [k, Wo]
    kept = xs[:, local[:, None, None], rows[:, :, None], cols[:, None, :]]   # [B, k, Ho, Wo]
    kept = kept.reshape(kept.shape[0], kept.shape[1], -1).float()
    if is_bias is not None:
        kept = kept.masked_fill(is_bias[None, :, None], 1.0)
    kept = kept.transpose(1, 2)
    return kept * scale if scale is not None else kept


def conv_tokens(op: str, x: torch.Tensor, g: torch.Tensor, B: int, conv: tuple, mask=None,
                d_in: int | None = None):
    """([B*groups, P, C_in/groups*kh*kw], [B*groups, P, C_out/groups]) or None (e.g. an
    unbatched input). With ``mask`` (idx, scale) the first item holds only the kept input
    coordinates, already scaled: compress_in(x) rather than x."""
    stride, padding, dilation, groups, kernel = conv
    spatial = 1 if op == "conv1d" else 2
    if x.dim() != spatial + 2 or x.shape[0] != B:
        return None
    if spatial == 1:  # a Conv1d is a Conv2d of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel = (1,) + tuple(kernel)
        stride, dilation = (1,) + _pair(stride, 1), (1,) + _pair(dilation, 1)
        padding = padding if isinstance(padding, str) else (0,) + _pair(padding, 1)
    kernel, stride, dilation = tuple(kernel), _pair(stride, 2), _pair(dilation, 2)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": total dilation*(k-1) per side pair, the odd one on the right/bottom
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2,
                          total[0] // 2, total[0] - total[0] // 2))
            padding = (0, 0)
    padding = _pair(padding, 2)
    if mask is not None:
        xs = _masked_patches(x, kernel, dilation, padding, stride, mask[0], mask[1], d_in,
                             tuple(g.shape[-2:]))
        return xs, g.reshape(B, g.shape[1], -1).transpose(1, 2)
    U = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C*kh*kw, P]
    P = U.shape[-1]
    if g.shape[-2] * g.shape[-1] != P:
        return None
    xs = U.reshape(B, groups, -1, P).transpose(2, 3).reshape(B * groups, P, -1)
    gs = g.reshape(B, groups, -1, P).transpose(2, 3).reshape(B * groups, P, -1)
    return xs, gs


def call_sketch(comp, call, g: torch.Tensor, B: int, layout: str, has_bias: bool, device):
    """[B, groups * k] sketch of one call, or None if the call does not fit ``layout``."""
    x = call.x
    if call.op == "linear":
        pair = linear_tokens(x, g, B, layout)
    else:
        mask = _input_mask(comp, call.conv[3])
        if mask is not None and mask[0] is None:  # all coordinates: one persistent index per size
            key = (comp.d_in, x.device)
            mask = (_EVERY.setdefault(key, torch.arange(comp.d_in, device=x.device)), None)
        pair = None if layout != "batch_first" else conv_tokens(
            call.op, x, g, B, call.conv, mask, comp.d_in - int(has_bias))
        if pair is not None and mask is not None:
            return comp.from_compressed_input(pair[0].to(device),
                                              pair[1].to(device, _float(x.dtype))).reshape(B, -1)
    if pair is None:
        return None
    xs, gs = pair
    xs = xs.to(device, _float(x.dtype))
    if has_bias:
        xs = torch.cat([xs, xs.new_ones(xs.shape[:-1] + (1,))], dim=-1)
    gs = gs.to(device, _float(x.dtype))
    return comp(xs, gs).reshape(B, -1)
