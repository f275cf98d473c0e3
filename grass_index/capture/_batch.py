"""Batch helpers shared by the hook path and the torch.func path: batch size, loss checks,
and the per-example (vmapped) loss that torch.func differentiates."""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import option
from .errors import CaptureError

log = logging.getLogger(__name__)


def batch_size(batch) -> int | None:
    """Leading dimension of the first tensor in the batch (None if it holds no tensor)."""
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def check_loss_shape(losses, expected: int | None) -> torch.Tensor:
    """The one rule for what a loss returns: one loss per example, a Tensor[B] (also checked up
    front by ``task.check_loss`` before any gradient work)."""
    if not isinstance(losses, torch.Tensor):
        raise CaptureError(
            f"loss must return a tensor of per-example losses, shape [B]; got {type(losses).__name__}")
    if losses.dim() != 1 or (expected is not None and losses.shape[0] != expected):
        want = f"[{expected}]" if expected is not None else "[B]"
        raise CaptureError(
            f"loss must return one loss per example, shape {want}; got shape "
            f"{tuple(losses.shape)}. Don't reduce with .mean()/.sum(): e.g. use "
            f"F.cross_entropy(..., reduction='none') and average over tokens per example")
    return losses


def check_losses(losses, expected: int | None) -> torch.Tensor:
    """Per-example losses are what makes per-example gradients possible; reject anything else."""
    check_loss_shape(losses, expected)
    if not losses.requires_grad:
        raise CaptureError(
            "the loss does not depend on the selected parameters (it has no gradient); check that "
            f"loss_fn calls the model it is given and that {option('layers')} selects parameters "
            "it uses")
    return losses


class _LossModule(nn.Module):
    """Makes ``loss_fn(model, batch)`` a module call so torch.func.functional_call can swap in
    the parameters being differentiated (parameter names gain the prefix 'model.')."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch):
        return self._loss_fn(self.model, batch)


def _one_loss(out) -> torch.Tensor:
    """The loss of a batch of one must have shape [1]; anything else means the loss reduces."""
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CaptureError(
            f"loss must return one loss per example, shape [B]; on a batch of one it returned "
            f"{shape}. Don't reduce with .mean()/.sum()")
    return out.sum()


def _vmap_grads(model, batch, loss_fn, names, n):
    from torch.func import functional_call, grad, vmap

    wrapper = _LossModule(model, loss_fn)
    params = dict(model.named_parameters())
    primals = {nm: params[nm].detach() for nm in names}

    def one(p, example):
        single = pytree.tree_map(
            lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
        return _one_loss(functional_call(wrapper, {f"model.{k}": v for k, v in p.items()},
                                         (single,)))

    in_dims = pytree.tree_map(
        lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None,
        batch)
    with torch.enable_grad():
        return vmap(grad(one), in_dims=(None, in_dims))(primals, batch)


def _loop_grads(model, batch, loss_fn, names, n):
    """One forward+backward per example: slow, but works for models vmap cannot trace
    (data-dependent control flow such as HF's SDPA mask shortcuts)."""
    params = dict(model.named_parameters())
    targets = [params[nm] for nm in names]
    out = {nm: [] for nm in names}
    frozen = [p for p in targets if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for i in range(n):
                single = pytree.tree_map(
                    lambda t: t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() > 0
                    and t.shape[0] == n else t, batch)
                loss = _one_loss(loss_fn(model, single))
                gs = torch.autograd.grad(loss, targets, allow_unused=True)
                for nm, p, g in zip(names, targets, gs):
                    out[nm].append(torch.zeros_like(p) if g is None else g)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return {nm: torch.stack(v) for nm, v in out.items()}


def per_example_grads(model: nn.Module, batch, loss_fn, names: list[str], method: str = "auto"
                      ) -> dict[str, torch.Tensor]:
    """{param name: [B, *param.shape]} gradients of each example's own loss.

    "vmap": torch.func functional_call + vmap(grad): one vmapped forward+backward of the whole
    model. "loop": one pass per example. "auto": vmap, falling back to the loop (with a
    warning) when the model cannot be vmapped (.item(), data-dependent control flow).
    """
    n = batch_size(batch)
    if n is None:
        raise CaptureError("the batch holds no tensor with a batch dimension; per-example "
                           "gradients need tensors whose first dimension is the batch")
    params = dict(model.named_parameters())
    missing = [nm for nm in names if nm not in params]
    if missing:
        raise CaptureError(f"unknown parameter(s) {missing}; use names from model.named_parameters()")
    if method == "loop":
        return _loop_grads(model, batch, loss_fn, names, n)
    if method not in ("auto", "vmap"):
        raise ValueError(f"unknown method {method!r}; use 'auto', 'vmap' or 'loop'")
    try:
        return _vmap_grads(model, batch, loss_fn, names, n)
    except (RuntimeError, NotImplementedError) as e:
        if method == "vmap":
            raise
        global _WARNED
        if not _WARNED:
            log.warning("torch.func.vmap cannot run this model (%s); computing per-example "
                        "gradients of non-linear parameters one example at a time",
                        str(e).splitlines()[0][:200])
            _WARNED = True
        return _loop_grads(model, batch, loss_fn, names, n)


_WARNED = False
