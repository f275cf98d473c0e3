"""Exact per-sample gradients (torch.func): the reference the hooked sketches are tested
against, flattened in the capture convention."""
from __future__ import annotations

import torch
from torch import nn

from ._batch import per_example_grads
from .layers import LayerInfo, linear_dims


def flatten_layer(model: nn.Module, layer: LayerInfo, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, numel] in the capture convention: linear -> [d_out, d_in (+ bias column)] row-major
    (HF Conv1D weights are stored [d_in, d_out], so they are transposed); conv -> [C_out,
    C_in/groups * kh * kw (+ bias column)] row-major, i.e. group after group; flat -> flatten()."""
    if layer.kind == "flat":
        g = grads[layer.param_names[0]]
        return g.reshape(g.shape[0], -1)
    gw = grads[layer.param_names[0]]
    if layer.kind == "conv":
        gw = gw.reshape(gw.shape[0], gw.shape[1], -1)
    elif (linear_dims(model.get_submodule(layer.module_name)) or (0, 0, False))[2]:
        gw = gw.transpose(1, 2)  # Conv1D: [B, d_in, d_out]
    if layer.has_bias:
        gw = torch.cat([gw, grads[layer.param_names[1]].unsqueeze(-1)], dim=-1)
    return gw.reshape(gw.shape[0], -1)


def per_sample_gradients(model: nn.Module, batch, loss_fn, layers: list[LayerInfo]
                         ) -> dict[str, torch.Tensor]:
    """{layer name: [B, numel]} exact gradient of each example's loss, for brute-force checks.
    Materialises every per-sample gradient: use on small models only."""
    names = [p for layer in layers for p in layer.param_names]
    grads = per_example_grads(model, batch, loss_fn, names)
    return {layer.name: flatten_layer(model, layer, grads).detach() for layer in layers}
