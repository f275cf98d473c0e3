"""Seeing every use of a selected weight during a sketch's forward.

A forward hook only fires for modules whose ``forward`` runs, and only sees the module's
final output: nn.MultiheadAttention hands ``in_proj_weight`` and ``out_proj.weight`` straight
to F.linear (out_proj's own forward never runs), a Linear subclass may scale or activate the
output of F.linear, a parent may call F.linear with a child's weight. So instead, while a
sketch's forward runs, F.linear / F.conv1d / F.conv2d are wrapped: every call whose weight is
a selected parameter records its input and the gradient edge of its raw output (the edge, not
the tensor, so a later in-place op on the output does not change what is differentiated).
HF's Conv1D multiplies with torch.addmm, so it is seen through a forward hook on the module.

The wrappers are installed only while at least one recording is active (reference-counted,
under a lock) and record only for the thread that started the recording.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge

_LOCK = threading.Lock()
_LOCAL = threading.local()
_DEPTH = 0
_ORIGINAL = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d}


@dataclass
class Call:
    """One use of a selected weight: the op, its (detached) input, the gradient edge of its
    output, and for convolutions (stride, padding, dilation, groups, kernel size)."""

    op: str
    x: torch.Tensor
    edge: object
    conv: tuple | None = None


class Recorder:
    """Collects the calls of the weights in ``weights`` ({id(parameter): layer name})."""

    def __init__(self, weights: dict[int, str]):
        self.weights = dict(weights)
        self.calls: dict[str, list[Call]] = {name: [] for name in set(weights.values())}

    def record(self, name: str, op: str, x, out, conv=None) -> None:
        if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad
                and isinstance(x, torch.Tensor)):
            return
        self.calls[name].append(Call(op, x.detach(), get_gradient_edge(out), conv))


def _active(weight) -> tuple[Recorder, str] | None:
    rec = getattr(_LOCAL, "recorder", None)
    if rec is None:
        return None
    name = rec.weights.get(id(weight))
    return None if name is None else (rec, name)


def _linear(input, weight, bias=None):
    out = _ORIGINAL["linear"](input, weight, bias)
    hit = _active(weight)
    if hit is not None:
        hit[0].record(hit[1], "linear", input, out)
    return out


def _conv(op: str):
    original = _ORIGINAL[op]

    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        out = original(input, weight, bias, stride, padding, dilation, groups)
        hit = _active(weight)
        if hit is not None:
            hit[0].record(hit[1], op, input, out,
                          (stride, padding, dilation, groups, tuple(weight.shape[2:])))
        return out

    conv.__name__ = op
    conv.__doc__ = original.__doc__
    return conv


_WRAPPED = {"linear": _linear, "conv1d": _conv("conv1d"), "conv2d": _conv("conv2d")}
_linear.__doc__ = _ORIGINAL["linear"].__doc__


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Route this thread's F.linear / F.conv1d / F.conv2d calls through ``recorder``."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            for name, fn in _WRAPPED.items():
                setattr(F, name, fn)
        _DEPTH += 1
    previous = getattr(_LOCAL, "recorder", None)
    _LOCAL.recorder = recorder
    try:
        yield recorder
    finally:
        _LOCAL.recorder = previous
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                for name, fn in _ORIGINAL.items():
                    setattr(F, name, fn)
