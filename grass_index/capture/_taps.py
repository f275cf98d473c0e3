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


def conv_tokens(op: str, x: torch.Tensor, g: torch.Tensor, B: int, conv: tuple):
    """([B*groups, P, C_in/groups*kh*kw], [B*groups, P, C_out/groups]) or None (e.g. an
    unbatched input)."""
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
        pair = None if layout != "batch_first" else conv_tokens(call.op, x, g, B, call.conv)
    if pair is None:
        return None
    xs, gs = pair
    xs = xs.to(device, _float(x.dtype))
    if has_bias:
        xs = torch.cat([xs, xs.new_ones(xs.shape[:-1] + (1,))], dim=-1)
    gs = gs.to(device, _float(x.dtype))
    return comp(xs, gs).reshape(B, -1)
