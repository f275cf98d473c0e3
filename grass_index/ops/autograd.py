"""Gradients. The two ops are adjoint to each other: the SJLT scatter's backward is a
signed gather (mask), and the gather's backward is a scatter into zeros (sjlt with +1
signs). Each backward therefore calls the other op, and stays compilable."""
import torch


def _sjlt_setup(ctx, inputs, output):
    x, idx, sign, k = inputs
    ctx.save_for_backward(idx, sign)


def _sjlt_backward(ctx, grad):
    idx, sign = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    d = idx.shape[-1]
    s = idx.shape[0] if idx.dim() == 2 else 1  # explicit: reshape(-1, 0) is ambiguous
    gathered = torch.ops.grass_index.mask.default(grad.contiguous(), idx.reshape(-1))
    signed = gathered.reshape(*grad.shape[:-1], s, d) * sign.reshape(s, d).to(grad.dtype)
    return signed.sum(-2), None, None, None


def _mask_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.d = x.shape[-1]


def _mask_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    ones = torch.ones_like(idx, dtype=torch.int8)
    return torch.ops.grass_index.sjlt.default(grad.contiguous(), idx, ones, ctx.d), None


torch.library.register_autograd("grass_index::sjlt", _sjlt_backward, setup_context=_sjlt_setup)
torch.library.register_autograd("grass_index::mask", _mask_backward, setup_context=_mask_setup)
