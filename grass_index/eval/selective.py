"""Selective Mask (GraSS §3): learn which gradient coordinates to keep.

Per layer, a sigmoid mask σ(s) over gradient coordinates is trained so that masked gradient
inner products  ⟨σ(s) ⊙ g_i, g_j⟩  match the full ones ⟨g_i, g_j⟩ on a sample of training
examples (relative squared error), plus an ℓ1 penalty  l1 · mean σ(s)  that pushes unneeded
coordinates to zero. The k largest logits are kept at the end. For a linear layer the mask
is factored, σ(s_out) ⊗ σ(s_in) over the [d_out, d_in(+bias)] gradient, and gives the
``{"in", "out"}`` indices a factored ``selective_mask-A*B`` spec needs; other parameters get
a flat mask (``{"flat"}``). Write the result with grass_index.compress.save_selective_mask.

Fitting materialises exact per-sample gradients of ``n_samples`` examples, so it is meant
for layers up to a few million coordinates (a sample of a few hundred examples suffices).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def _parse_k(k) -> tuple[int, ...]:
    if isinstance(k, int):
        dims = (k,)
    elif isinstance(k, (tuple, list)):
        dims = tuple(int(x) for x in k)
    else:
        try:
            dims = tuple(int(x) for x in str(k).lower().split("*"))
        except ValueError:
            dims = ()
    if len(dims) not in (1, 2) or any(d <= 0 for d in dims):
        raise ValueError(f"selective mask size {k!r}: give k (flat, e.g. 4096) or k_in*k_out "
                         "(factored, e.g. 128*128) with positive integers")
    return dims


def _fit_one(g: torch.Tensor, shape: tuple[int, ...], steps: int, lr: float, l1: float,
             gen: torch.Generator) -> list[torch.Tensor]:
    """Logits for one layer. g: [n, numel] per-sample gradients; shape: (numel,) or (d_out, d_in)."""
    g = g.float()
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)   # every example counts equally
    target = g @ g.T
    scale = target.pow(2).mean().clamp_min(1e-30)
    logits = [torch.full((d,), 2.0, dtype=torch.float32) + 0.01 * torch.randn(d, generator=gen)
              for d in shape]
    for t in logits:
        t.requires_grad_(True)
    opt = torch.optim.Adam(logits, lr=lr)
    for _ in range(steps):
        masks = [torch.sigmoid(t) for t in logits]
        w = masks[0] if len(masks) == 1 else torch.outer(masks[0], masks[1]).reshape(-1)
        k_masked = (g * w) @ g.T
        loss = (k_masked - target).pow(2).mean() / scale + l1 * sum(m.mean() for m in masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [t.detach() for t in logits]


def fit_selective_mask(model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, k, *,
                       layers=None, n_samples: int = 128, steps: int = 200, lr: float = 0.05,
                       l1: float = 0.05, seed: int = 0, collate: Callable | None = None,
                       batch_size: int = 64) -> dict[str, dict[str, torch.Tensor]]:
    """Learned mask indices per layer, ready for save_selective_mask.

    k: ``k`` (flat masks everywhere) or ``"k_in*k_out"`` (factored for linear layers; other
    parameters get a flat mask of k_in*k_out). Sizes larger than a layer are clamped to it.
    """
    from ..capture import per_sample_gradients, select_layers
    from ..capture.exact import flatten_layer  # noqa: F401  (layout convention documented there)
    from ..task import default_collate

    dims = _parse_k(k)
    if n_samples < 2:
        raise ValueError(f"n_samples={n_samples}; the mask is fit on inner products between "
                         "examples, so use at least 2 (a few hundred is typical)")
    collate = collate or default_collate
    infos = select_layers(model, layers)
    gen = torch.Generator().manual_seed(seed)
    n = min(n_samples, len(train_data))
    ids = torch.randperm(len(train_data), generator=gen)[:n].tolist()
    model.eval()
    grads: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in infos}
    for s in range(0, n, batch_size):
        batch = collate([train_data[i] for i in ids[s:s + batch_size]])
        for name, g in per_sample_gradients(model, batch, loss_fn, infos).items():
            grads[name].append(g.detach().cpu())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for layer in infos:
        g = torch.cat(grads[layer.name])
        if not torch.isfinite(g).all():
            raise ValueError(f"layer {layer.name}: NaN/inf per-sample gradients; fix the model or "
                             "loss before fitting a mask")
        if len(dims) == 2 and layer.kind == "linear":
            d_in, d_out = layer.d_in_eff, layer.d_out
            k_in, k_out = min(dims[0], d_in), min(dims[1], d_out)
            s_out, s_in = _fit_one(g, (d_out, d_in), steps, lr, l1, gen)
            out[layer.name] = {"in": _topk(s_in, k_in), "out": _topk(s_out, k_out)}
        else:
            kk = min(dims[0] * (dims[1] if len(dims) == 2 else 1), g.shape[1])
            (s,) = _fit_one(g, (g.shape[1],), steps, lr, l1, gen)
            out[layer.name] = {"flat": _topk(s, kk)}
    return out


def _topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest logits, ascending (a deterministic, cache-friendly order)."""
    return torch.sort(torch.topk(logits, k).indices).values.long()
