"""Selective Mask (GraSS §3): learn which gradient coordinates to keep.

Per layer, a sigmoid mask w = σ(s) over gradient coordinates is trained so that the
*attribution scores computed from masked gradients* preserve the ones computed from the full
gradients, plus an ℓ1 penalty ``l1 · mean σ(s)`` that pushes unneeded coordinates to zero;
the k largest logits are kept at the end. For a linear layer the mask is factored,
σ(s_out) ⊗ σ(s_in) over the [d_out, d_in(+bias)] gradient, and gives the ``{"in", "out"}``
indices a factored ``selective_mask-A*B`` spec needs; other parameters get a flat mask
(``{"flat"}``). Write the result with grass_index.compress.save_selective_mask.

What is matched (and why). The index ranks training examples by the *preconditioned* score
``g_qᵀ (F + λI)⁻¹ g_i`` (eFIM, relative damping λ = damping × mean eigenvalue of F), not by the
raw inner product ``g_qᵀ g_i``. Matching raw inner products favours high-magnitude
coordinates, which are highly redundant (the same hidden unit or input pixel across many
weights); after whitening by F they add little, and such masks scored *below* random masks
on digits. So the fit matches preconditioned scores, in closed form on a sample:

* the sampled examples are split into an "F/train" part G (N examples) and a disjoint
  "query" part A (training examples playing queries, so no test data is touched);
* with masked gradients w ⊙ g, F_w = G_wᵀG_w / N and Woodbury give
  ``S_w = N · K_AG(w) (N λ_w I + K_GG(w))⁻¹`` where ``K_XY(w) = Σ_j w_j² x_j y_j`` — only
  N×N matrices, differentiable in w. Down-weighting a coordinate acts as a large ridge on it
  (``(W F W + λ I)⁻¹ = W⁻¹ (F + λ W⁻²)⁻¹ W⁻¹``), i.e. it smoothly removes it;
* the loss is ``1 − mean_a corr(S_w[a, :], S_full[a, :])``: each query's row of scores only
  needs the right *shape* — LDS ranks equal-size subsets by summed scores, which is invariant
  to a per-query scale and shift.

On digits (k=256 per layer) this lifts the learned mask from below a random mask (0.432 vs
0.44-0.45 LDS, raw inner-product matching) to ~0.49 (benchmarks/quality.py has the table).
The preconditioned scores do not change under a common scale of w, so the ℓ1 term mostly
lowers all logits together; the selection comes from the fit term's differences, and top-k
fixes the size.

``hessian="identity"`` matches raw inner products instead (S = K_AG(w), relative squared
error — the paper's objective), for indexes built without preconditioning.

Fitting materialises exact per-sample gradients of ``n_samples`` examples and costs
O(steps · N² · numel) per layer, so it is meant for layers up to a few million coordinates.
"""
from __future__ import annotations


from typing import Callable, Sequence

import torch

from .errors import MaskFitError


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
        raise MaskFitError(f"selective mask size {k!r}: give k (flat, e.g. 4096) or k_in*k_out "
                         "(factored, e.g. 128*128) with positive integers")
    return dims


def _scores(ga: torch.Tensor, gg: torch.Tensor, w2: torch.Tensor, damping: float | None,
            dim: int) -> torch.Tensor:
    """Scores of queries ``ga`` against ``gg`` with coordinate weights ``w2`` (= w²).

    damping None: raw inner products. Otherwise eFIM F = Σ (w⊙g)(w⊙g)ᵀ / N over ``gg`` with
    λ = damping × tr(F) / dim (dim = the kept size), through the N×N (Woodbury) form.
    """
    gw = gg * w2
    ka = ga @ gw.T                                   # [n_a, N]
    if damping is None:
        return ka
    n = gg.shape[0]
    k = gw @ gg.T                                    # [N, N]
    lam = damping * k.diagonal().sum() / (n * dim)   # relative: damping × tr(F_w) / dim
    eye = torch.eye(n, dtype=k.dtype)
    return torch.linalg.solve(n * lam.clamp_min(1e-30) * eye + k, ka.T).T * n


def _row_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)).mean()


def _fit_one(gg: torch.Tensor, ga: torch.Tensor, shape: tuple[int, ...], keep: int,
             damping: float | None, steps: int, lr: float, l1: float,
             gen: torch.Generator) -> list[torch.Tensor]:
    """Logits for one layer. gg/ga: [N|n_a, numel] gradients; shape: (numel,) or (d_out, d_in);
    keep: how many coordinates the final mask keeps (sets the relative damping's scale)."""
    numel = gg.shape[1]
    with torch.no_grad():
        target = _scores(ga, gg, torch.ones(numel), damping, numel)
    logits = [torch.full((d,), 2.0, dtype=torch.float32) + 0.01 * torch.randn(d, generator=gen)
              for d in shape]
    for t in logits:
        t.requires_grad_(True)
    opt = torch.optim.Adam(logits, lr=lr)
    for _ in range(steps):
        masks = [torch.sigmoid(t) for t in logits]
        w = masks[0] if len(masks) == 1 else torch.outer(masks[0], masks[1]).reshape(-1)
        s = _scores(ga, gg, w * w, damping, keep)
        if damping is None:   # raw inner products (identity Hessian): their scale matters too
            fit = (s - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)
        else:
            fit = 1.0 - _row_corr(s, target)
        loss = fit + l1 * sum(m.mean() for m in masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [t.detach() for t in logits]


def fit_selective_mask(model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, k, *,
                       layers=None, n_samples: int = 768, steps: int = 300, lr: float = 0.05,
                       l1: float = 0.1, hessian: str = "eFIM", damping=None, seed: int = 0,
                       collate: Callable | None = None,
                       batch_size: int = 64) -> dict[str, dict[str, torch.Tensor]]:
    """Learned mask indices per layer, ready for save_selective_mask.

    k: ``k`` (flat masks everywhere) or ``"k_in*k_out"`` (factored for linear layers; other
    parameters get a flat mask of k_in*k_out). Sizes larger than a layer are clamped to it.
    n_samples training examples are drawn (seeded); a third play queries, the rest estimate F.
    hessian/damping: those the index will be built with (relative damping; default
    grass_index's DEFAULT_DAMPING); On digits (k=256 per layer) this lifts the learned mask from below a random mask (0.432 vs
0.44-0.45 LDS, raw inner-product matching) to ~0.49 (benchmarks/quality.py has the table).
The preconditioned scores do not change under a common scale of w, so the ℓ1 term mostly
lowers all logits together; the selection comes from the fit term's differences, and top-k
fixes the size.

``hessian="identity"`` matches raw inner products.
    """
    from ..capture import per_sample_gradients, select_layers
    from ..precondition import DEFAULT_DAMPING, PreconditionError, canonical_hessian, parse_damping
    from ..task import default_collate

    dims = _parse_k(k)
    if n_samples < 3:
        raise MaskFitError(f"n_samples={n_samples}; the mask is fit on scores between sampled "
                         "examples, so use at least 3 (several hundred is typical)")
    try:
        h = canonical_hessian(hessian)
    except PreconditionError:
        raise MaskFitError(f"hessian={hessian!r}; use 'eFIM' or 'identity' (as for build_index)") from None
    if h == "ekfac":
        raise MaskFitError("the mask fit has no EK-FAC objective; fit it with hessian='eFIM' "
                           "(the Fisher EK-FAC approximates) and build with --hessian ekfac")
    if h == "identity":
        damp = None
    else:
        mode, damp = parse_damping(DEFAULT_DAMPING if damping is None else damping)
        if mode != "relative":
            raise MaskFitError(f"damping={damping!r}: the mask fit needs a relative damping (a "
                             "factor of the mean eigenvalue, e.g. 0.3), not an absolute one")
    collate = collate or default_collate
    infos = select_layers(model, layers)
    gen = torch.Generator().manual_seed(seed)
    n = min(n_samples, len(train_data))
    if n < 3:
        raise MaskFitError(f"{len(train_data)} training examples; fitting a mask needs at least 3")
    ids = torch.randperm(len(train_data), generator=gen)[:n].tolist()
    n_a = max(1, n // 3)                      # queries: disjoint from the F sample
    model.eval()
    grads: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in infos}
    for s in range(0, n, batch_size):
        batch = collate([train_data[i] for i in ids[s:s + batch_size]])
        for name, g in per_sample_gradients(model, batch, loss_fn, infos).items():
            grads[name].append(g.detach().cpu())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for layer in infos:
        g = torch.cat(grads[layer.name]).double()
        if not torch.isfinite(g).all():
            raise MaskFitError(f"layer {layer.name}: NaN/inf per-sample gradients; fix the model or "
                             "loss before fitting a mask")
        # one global scale (scores are compared by correlation, damping is relative): float32-safe
        g = (g / g.pow(2).mean().sqrt().clamp_min(1e-300)).float()
        ga, gg = g[:n_a], g[n_a:]
        if len(dims) == 2 and layer.kind == "linear":
            d_in, d_out = layer.d_in_eff, layer.d_out
            k_in, k_out = min(dims[0], d_in), min(dims[1], d_out)
            s_out, s_in = _fit_one(gg, ga, (d_out, d_in), k_in * k_out, damp, steps, lr, l1, gen)
            out[layer.name] = {"in": _topk(s_in, k_in), "out": _topk(s_out, k_out)}
        else:
            kk = min(dims[0] * (dims[1] if len(dims) == 2 else 1), g.shape[1])
            (s,) = _fit_one(gg, ga, (g.shape[1],), kk, damp, steps, lr, l1, gen)
            out[layer.name] = {"flat": _topk(s, kk)}
    return out


def _topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest logits, ascending (a deterministic, cache-friendly order)."""
    return torch.sort(torch.topk(logits, k).indices).values.long()
