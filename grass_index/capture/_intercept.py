"""Seeing every use of a selected weight during a sketch's forward.

A forward hook only fires for modules whose ``forward`` runs, and only sees the module's
final output: nn.MultiheadAttention hands ``in_proj_weight`` and ``out_proj.weight`` straight
to F.linear (out_proj's own forward never runs), a Linear subclass may scale or activate the
output of F.linear, a parent may call F.linear with a child's weight. So instead, while a
sketch's forward runs, a ``TorchFunctionMode`` (PyTorch's way to see every torch call of a
region) watches F.linear, F.conv1d, F.conv2d and torch.addmm (HF's Conv1D: ``addmm(bias, x,
weight)``): every call whose weight is a selected parameter records its input and the
gradient edge of its raw output (the edge, not the tensor, so a later in-place op on the
output does not change what is differentiated).

A mode lives on the calling thread's stack only and leaves with its ``with`` block, so other
threads (serve's sketching pool, a training loop) and code after an exception never see it,
and it composes with the caller's own modes.

One limit of modes: a torch function written in Python (F.multi_head_attention_forward,
F.dropout, ...) reaches the mode once, as itself, and the mode is off while it runs, so the
F.linear calls inside it would go unseen (pytorch/pytorch#131947). Such a function is run
through ``_open``: the same code and closure with its own "is there a torch-function
override?" test answered "no", under the mode, so its inner calls are seen like any other.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode


@dataclass
class Call:
    """One use of a selected weight: the op, its (detached) input, the gradient edge of its
    output, and for convolutions (stride, padding, dilation, groups, kernel size)."""

    op: str
    x: torch.Tensor
    edge: object
    conv: tuple | None = None


def _arg(args, kwargs, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _linear_use(args, kwargs):
    """(input, weight, conv geometry) of an F.linear call."""
    return _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), None


def _addmm_use(args, kwargs):
    """HF Conv1D: addmm(bias, x [N, d_in], weight [d_in, d_out]); scaled forms are not a
    plain use of the weight (the check then finds the layer's uses incomplete)."""
    if kwargs.get("alpha", 1) != 1 or kwargs.get("beta", 1) != 1:
        return None, None, None
    return _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2"), None


def _conv_use(args, kwargs):
    weight = _arg(args, kwargs, 1, "weight")
    geometry = tuple(_arg(args, kwargs, i, name, default) for i, name, default in
                     ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)))
    kernel = tuple(weight.shape[2:]) if isinstance(weight, torch.Tensor) else ()
    return _arg(args, kwargs, 0, "input"), weight, geometry + (kernel,)


# the watched functions: {function: (op recorded, how to read its input and weight)}
_USES = {F.linear: ("linear", _linear_use), torch.addmm: ("linear", _addmm_use),
         F.conv1d: ("conv1d", _conv_use), F.conv2d: ("conv2d", _conv_use)}
_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")
_OPENED: dict = {}


def _never(*_args) -> bool:
    return False


def _reaches_a_use(func, seen: set) -> bool:
    """Whether ``func``'s code names a watched function, directly (``linear``,
    ``torch.addmm``) or through another Python function of its module that does."""
    scope = func.__globals__
    for name in func.__code__.co_names:
        for target in (scope.get(name), getattr(torch, name, None)):
            if target is None or isinstance(target, type):
                continue
            if target in _USES:
                return True
            if isinstance(target, types.FunctionType) and target.__module__ == func.__module__ \
                    and target not in seen:
                seen.add(target)
                if _reaches_a_use(target, seen):
                    return True
    return False


def _open(func):
    """``func`` with its torch-function test answered "no" (so it runs its own body rather
    than handing itself to the mode again), or None when there is nothing to see inside it:
    a builtin, a function that never reaches F.linear / F.conv* / torch.addmm (F.relu,
    F.cross_entropy: called as they are, at no extra cost), or one outside
    torch.nn.functional (Tensor methods written in Python call their builtin through
    ``super()``, which hands the Python method back to the mode). Built once per function;
    its globals are a copy, so nothing shared is changed."""
    if not (isinstance(func, types.FunctionType) and func.__module__ == F.__name__):
        return None
    if func in _OPENED:
        return _OPENED[func]
    opened = None
    code = func.__code__
    if any(name in code.co_names for name in _CHECKS) and _reaches_a_use(func, {func}):
        scope = dict(func.__globals__)
        scope.update({name: _never for name in _CHECKS})
        opened = types.FunctionType(code, scope, func.__name__, func.__defaults__,
                                    func.__closure__)
        opened.__kwdefaults__ = func.__kwdefaults__
    _OPENED[func] = opened
    return opened


class Recorder(TorchFunctionMode):
    """Collects the calls of the weights in ``weights`` ({id(parameter): layer name}) made
    on this thread inside ``with recorder:``."""

    def __init__(self, weights: dict[int, str]):
        super().__init__()
        self.weights = dict(weights)
        self.calls: dict[str, list[Call]] = {name: [] for name in set(weights.values())}
        self._opened: set = set()  # the Python-level functions running opened now

    def record(self, name: str, op: str, x, out, conv=None) -> None:
        if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad
                and isinstance(x, torch.Tensor)):
            return
        self.calls[name].append(Call(op, x.detach(), get_gradient_edge(out), conv))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        use = _USES.get(func)
        if use is not None:
            out = func(*args, **kwargs)
            x, weight, conv = use[1](args, kwargs)
            name = self.weights.get(id(weight)) if weight is not None else None
            if name is not None:
                self.record(name, use[0], x, out, conv)
            return out
        opened = _open(func)
        if opened is None or func in self._opened:  # (the latter: it handed itself back)
            return func(*args, **kwargs)
        self._opened.add(func)
        try:
            with self:  # the function's body, with this mode watching its inner calls
                return opened(*args, **kwargs)
        finally:
            self._opened.discard(func)
