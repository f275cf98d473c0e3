"""Selective Mask (GraSS §3): learn which gradient coordinates to keep.

Per layer, a sigmoid mask w = σ(s) over gradient coordinates is trained so that the
*attribution scores computed from masked gradients* preserve the ones computed from the full
gradients, plus an ℓ1 penalty ``l1 · mean σ(s)`` (summed over the mask's factors) that pushes
unneeded coordinates to zero; the k largest logits are kept at the end. For a linear layer
the mask is factored, σ(s_out) ⊗ σ(s_in) over the [d_out, d_in(+bias)] gradient, and gives the
``{"in", "out"}`` indices a factored ``selective_mask-A*B`` spec needs; other parameters get a
flat mask (``{"flat"}``). Write the result with grass_index.compress.save_selective_mask.

The sample: ``n_samples`` training examples (seeded), split into a "query" part A (the first
third; training examples playing queries, so no test data is touched) and a disjoint "F/train"
part G (N examples). Every objective is a function of the masked Gram matrix
``K_XY(w) = Σ_c w_c² x_c y_c`` between those examples' gradients of the layer.

``hessian="eFIM"`` (default) — what is matched, and why. The index ranks training examples by
the *preconditioned* score ``g_qᵀ (F + λI)⁻¹ g_i`` (eFIM; λ by the index's damping: "auto",
the default, from F's spectrum, or a relative factor × the mean eigenvalue of F), not by the
raw inner product ``g_qᵀ g_i``. Matching raw inner products favours high-magnitude
coordinates, which are highly redundant (the same hidden unit or input pixel across many
weights); after whitening by F they add little, and such masks scored
*below* random masks on digits. So the fit matches preconditioned scores, in closed form on
the sample: with masked gradients w ⊙ g, F_w = G_wᵀG_w / N and Woodbury give
``S_w = N · K_AG(w) (N λ_w I + K_GG(w))⁻¹`` (λ_w: auto's rule on the eigenvalues of
K_GG(w) / N, or factor × tr(F_w) / k, k the size the mask will keep) — only N×N matrices,
differentiable in w. Down-weighting a coordinate acts as a large ridge on it
(``(W F W + λ I)⁻¹ = W⁻¹ (F + λ W⁻²)⁻¹ W⁻¹``), i.e. it smoothly removes it.
The loss minimised is ``1 − mean_a corr(S_w[a, :], S_1[a, :]) + l1 · Σ mean σ(s)``: each
query's row of scores only needs the right *shape* — LDS ranks equal-size subsets by summed
scores, which is invariant to a per-query scale and shift. On digits (k=256 per layer) this
lifts the learned mask from below a random mask (0.432 vs 0.44-0.45 LDS, raw inner-product
matching) to ~0.49 (benchmarks/quality.py has the table). The preconditioned scores do not
change under a common scale of w, so the ℓ1 term mostly lowers all logits together; the
selection comes from the fit term's differences, and top-k fixes the size.

``hessian="identity"`` — for indexes built without preconditioning, whose scores are the raw
inner products S_w = K_AG(w). The loss minimised is the relative squared error
``‖K_AG(w) − K_AG(1)‖²_F / ‖K_AG(1)‖²_F + l1 · Σ mean σ(s)``: the masked inner products must
keep their *values*, scale included, not only their per-query order. This is not the paper's
objective: GraSS (and its reference code) maximise the mean per-query Pearson correlation of
masked against full inner products with an ℓ1 penalty on σ(s); the two agree on which
coordinates carry the inner products, but the squared error also penalises a mask that
shrinks every score by a common factor.

Memory and time. Layers are fitted one at a time, in model order. A linear layer's sampled
gradients are held as factors (per token: its input x_t and output gradient Dy_t, as the
reference code does for factored masks), T·(d_in + d_out) numbers per example instead of
d_out·d_in, and K(w) is accumulated from gradients formed block by block inside the
``memory_gb`` budget (grass_index/maskfit/gram.py). The examples are streamed: each pass
over the sample runs forward+backward batch by batch and keeps the factors of only as many
layers as fit in the budget (at least one), so the peak is about 2.5 × memory_gb plus the
model and one batch's forward/backward, whatever the number of layers (a single layer whose
factors alone exceed the budget gets a pass of its own and goes over it by that much). Convolutions and flat parameters
use formed exact per-sample gradients (one group of layers at a time). Each step costs
O(n · N · numel) per layer (as before), so large layers want a fast machine or a smaller
sample; benchmarks/selective_lm.py measures GPT-2 small (README: Selective Mask).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import option
from .errors import MaskFitError
from .gram import LayerGrads

log = logging.getLogger(__name__)


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


def _scores(K: torch.Tensor, n_a: int, damping: tuple[str, float] | None,
            dim: int) -> torch.Tensor:
    """Scores of the query part against the F part from ``K`` = K(w)[:rows, n_a:] (rows =
    n_a for raw inner products, every example otherwise).

    damping None: raw inner products K_AG. Otherwise eFIM F = Σ (w⊙g)(w⊙g)ᵀ / N over the F
    part, through the N×N (Woodbury) form, with λ = factor × tr(F) / dim for a relative
    ("relative", factor) damping (dim = the kept size) or, for ("auto", multiple), the
    library's rule on F's spectrum — its nonzero eigenvalues are those of the N×N K_GG / N —
    held constant within a step (as the index will compute it once from the final F).
    """
    ka = K[:n_a]                                     # [n_a, N]
    if damping is None:
        return ka
    k = K[n_a:]                                      # [N, N]
    n = k.shape[0]
    mode, value = damping
    if mode == "auto":
        from ..precondition.damping import auto_damping

        with torch.no_grad():
            e = torch.linalg.eigvalsh(k.detach().to(torch.float64)) / n
        lam = torch.tensor(auto_damping(e.numpy(), value), dtype=k.dtype)
    else:
        lam = value * k.diagonal().sum() / (n * dim)  # relative: factor × tr(F_w) / dim
    eye = torch.eye(n, dtype=k.dtype)
    return torch.linalg.solve(n * lam.clamp_min(1e-30) * eye + k, ka.T).T * n


def _row_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)).mean()


def _fit_one(lg: LayerGrads, n_a: int, shape: tuple[int, ...], keep: int,
             damping: tuple[str, float] | None, steps: int, lr: float, l1: float,
             gen: torch.Generator) -> tuple[list[torch.Tensor], float]:
    """Logits for one layer and the final fit term. lg: the layer's sampled gradients (the
    first n_a play queries); shape: (numel,) or (d_out, d_in); keep: how many coordinates
    the final mask keeps (sets a relative damping's scale)."""
    rows = lg.n if damping is not None else n_a
    with torch.no_grad():
        target = _scores(lg.gram(torch.ones(lg.numel), rows, n_a), n_a, damping, lg.numel)
    logits = [torch.full((d,), 2.0, dtype=torch.float32) + 0.01 * torch.randn(d, generator=gen)
              for d in shape]
    for t in logits:
        t.requires_grad_(True)
    opt = torch.optim.Adam(logits, lr=lr)
    fit = torch.tensor(float("nan"))
    for _ in range(steps):
        masks = [torch.sigmoid(t) for t in logits]
        w = masks[0] if len(masks) == 1 else torch.outer(masks[0], masks[1]).reshape(-1)
        s = _scores(lg.gram(w * w, rows, n_a), n_a, damping, keep)
        if damping is None:   # raw inner products (identity Hessian): their scale matters too
            fit = (s - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)
        else:
            fit = 1.0 - _row_corr(s, target)
        loss = fit + l1 * sum(m.mean() for m in masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [t.detach() for t in logits], float(fit.detach())


@dataclass(frozen=True)
class MaskFitOptions:
    """How a Selective Mask is fitted (everything but the model, data, loss and size).

    layers: ``--layers`` globs (None: the default selection). n_samples training examples are
    drawn (seeded by ``seed``); a third play queries, the rest estimate F. steps, lr: Adam on
    the mask logits; l1: the sparsity penalty. hessian/damping: those the index will be built
    with ("auto", the library's default, or a relative factor; None: 0.3, the default before
    "auto"); ``"identity"`` matches raw
    inner products. collate, batch_size: how the sample is batched (default: the task
    default). memory_gb: budget for the held gradients/factors of a pass and a layer's fit
    (peak about 2.5 × this plus the model and one batch). capture: ``"factors"`` (linear
    layers from their per-token factors, streamed), ``"exact"`` (formed per-example
    gradients, one group of layers at a time: the reference the factored fit is tested
    against) or ``"auto"``: exact when every selected layer's formed gradients fit in the
    budget (small models keep exactly the masks they always got), factors otherwise.
    """

    layers: Sequence[str] | None = None
    n_samples: int = 768
    steps: int = 300
    lr: float = 0.05
    l1: float = 0.1
    hessian: str = "eFIM"
    damping: float | str | None = "auto"
    seed: int = 0
    collate: Callable | None = None
    batch_size: int = 64
    memory_gb: float = 2.0
    capture: str = "auto"


def _options(options: MaskFitOptions | None, settings: dict) -> MaskFitOptions:
    """``options`` with ``settings`` (keyword arguments naming its fields) applied."""
    names = [f.name for f in dataclasses.fields(MaskFitOptions)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise MaskFitError(f"unknown mask-fit setting(s) {unknown}; the settings are {names}")
    return dataclasses.replace(options or MaskFitOptions(), **settings)


def _damping(opts: MaskFitOptions) -> tuple[str, float] | None:
    """Check the options; the objective's damping, ("relative", factor) or ("auto",
    multiple) (None: raw inner products)."""
    from ..precondition import PreconditionError, canonical_hessian, parse_damping

    if opts.n_samples < 3:
        raise MaskFitError(f"n_samples={opts.n_samples}; the mask is fit on scores between "
                           "sampled examples, so use at least 3 (several hundred is typical)")
    if opts.capture not in ("auto", "factors", "exact"):
        raise MaskFitError(f"capture={opts.capture!r}; use 'auto' (default), 'factors' or 'exact'")
    if not opts.memory_gb > 0:
        raise MaskFitError(f"{option('memory_gb', opts.memory_gb)}: give a positive budget "
                           "in GiB, e.g. 2")
    if opts.batch_size < 1:
        raise MaskFitError(f"batch_size={opts.batch_size}; use a positive batch size, e.g. 16")
    try:
        h = canonical_hessian(opts.hessian)
    except PreconditionError:
        raise MaskFitError(f"hessian={opts.hessian!r}; use 'eFIM' or 'identity' (as for "
                           "build_index)") from None
    if h == "ekfac":
        raise MaskFitError("the mask fit has no EK-FAC objective; fit it with hessian='eFIM' "
                           "(the Fisher EK-FAC approximates) and build with "
                           f"{option('hessian', 'ekfac')}")
    if h == "identity":
        return None
    try:
        mode, damp = parse_damping(opts.damping)
    except PreconditionError as e:
        raise MaskFitError(str(e)) from None
    if mode == "absolute":
        raise MaskFitError(f"damping={opts.damping!r}: the mask fit needs 'auto' or a relative "
                           "damping (a factor of the mean eigenvalue, e.g. 0.3), not an "
                           "absolute one")
    return mode, damp


@dataclass
class _Sample:
    """The sampled training examples: ids (the first ``n_a`` play queries) and their
    batches."""

    ids: list[int]
    n_a: int
    batches: list[list[int]]
    load: Callable


def _sample(train_data, opts: MaskFitOptions, gen: torch.Generator) -> _Sample:
    from ..task import default_collate

    collate = opts.collate or default_collate
    n = min(opts.n_samples, len(train_data))
    if n < 3:
        raise MaskFitError(f"{len(train_data)} training examples; fitting a mask needs at least 3")
    ids = torch.randperm(len(train_data), generator=gen)[:n].tolist()
    return _Sample(ids=ids, n_a=max(1, n // 3),      # queries: disjoint from the F sample
                   batches=[ids[s:s + opts.batch_size] for s in range(0, n, opts.batch_size)],
                   load=lambda part: collate([train_data[i] for i in part]))


def _grabber(model, loss_fn, infos, sample: _Sample, capture: str):
    """(grab(batch, layers) -> {layer: LayerBatch}, bytes held per example per layer)."""
    from ..capture import per_sample_gradients
    from ..capture.factors import FactorCapture, LayerBatch

    if capture == "factors":
        cap = FactorCapture(model, infos)
        first = sample.batches[0]
        cap.check(sample.load(first if len(first) >= 2 else sample.ids[:2]), loss_fn)
        probe = cap.capture(sample.load(sample.ids[:2]), loss_fn, infos)  # bytes per example
        return (lambda batch, group: cap.capture(batch, loss_fn, group),
                {name: lb.nbytes / 2 for name, lb in probe.items()})

    def grab(batch, group):
        return {name: LayerBatch(grads=g.detach().float().cpu()) for name, g in
                per_sample_gradients(model, batch, loss_fn, group).items()}
    return grab, {layer.name: 4 * layer.numel for layer in infos}


def _passes(infos, per_example: dict, n: int, budget: int) -> list[list]:
    """Consecutive layers whose held data fit in the budget together: one pass each."""
    groups: list[list] = []
    for layer in infos:
        need = n * per_example[layer.name]
        if groups and sum(n * per_example[x.name] for x in groups[-1]) + need <= budget:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def _fit_layer(layer, lg: LayerGrads, dims, n_a: int, damp, opts: MaskFitOptions, gen):
    """(mask indices {"in", "out"} or {"flat"}, final fit term) of one layer."""
    steps, lr, l1 = opts.steps, opts.lr, opts.l1
    if len(dims) == 2 and layer.kind == "linear":
        d_out, d_in = lg.shape
        k_in, k_out = min(dims[0], d_in), min(dims[1], d_out)
        (s_out, s_in), fit = _fit_one(lg, n_a, lg.shape, k_in * k_out, damp, steps, lr, l1, gen)
        return {"in": _topk(s_in, k_in), "out": _topk(s_out, k_out)}, fit
    kk = min(dims[0] * (dims[1] if len(dims) == 2 else 1), lg.numel)
    (s,), fit = _fit_one(lg, n_a, (lg.numel,), kk, damp, steps, lr, l1, gen)
    return {"flat": _topk(s, kk)}, fit


def fit_selective_mask(model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, k,
                       options: MaskFitOptions | None = None, *, stats: dict | None = None,
                       **settings) -> dict[str, dict[str, torch.Tensor]]:
    """Learned mask indices per layer, ready for save_selective_mask (the module docstring
    says what is optimised).

    k: ``k`` (flat masks everywhere) or ``"k_in*k_out"`` (factored for linear layers; other
    parameters get a flat mask of k_in*k_out). Sizes larger than a layer are clamped to it.
    options: a MaskFitOptions; ``settings`` are its fields by name (``n_samples=256``), applied
    on top. stats: a dict to fill with {layer: {"route", "n", "held_bytes", "seconds",
    "fit"}} and {"passes": number of passes over the sample}.
    """
    from ..capture import select_layers

    opts = _options(options, settings)
    dims = _parse_k(k)
    damp = _damping(opts)
    infos = select_layers(model, opts.layers)
    gen = torch.Generator().manual_seed(opts.seed)
    sample = _sample(train_data, opts, gen)
    n = len(sample.ids)
    model.eval()
    budget = int(opts.memory_gb * 2 ** 30)
    capture = opts.capture
    if capture == "auto":
        capture = "exact" if 4 * n * sum(layer.numel for layer in infos) <= budget else "factors"
    grab, per_example = _grabber(model, loss_fn, infos, sample, capture)
    groups = _passes(infos, per_example, n, budget)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if stats is not None:
        stats["passes"] = len(groups)
    for group in groups:
        parts: dict[str, list] = {layer.name: [] for layer in group}
        for part in sample.batches:
            for name, lb in grab(sample.load(part), group).items():
                parts[name].append(lb)
        for layer in group:
            t0 = time.perf_counter()
            shape = (layer.d_out, layer.d_in_eff) if layer.kind == "linear" else (layer.numel,)
            held = sum(lb.nbytes for lb in parts[layer.name])
            lg = LayerGrads(layer.name, parts.pop(layer.name), shape, budget)
            route = "exact" if lg.plain else "factors"
            out[layer.name], fit = _fit_layer(layer, lg, dims, sample.n_a, damp, opts, gen)
            del lg
            if stats is not None:
                stats[layer.name] = dict(route=route, n=n, held_bytes=held, fit=fit,
                                         seconds=time.perf_counter() - t0)
            log.info("selective mask: layer %s fitted (%s, %.1fs)", layer.name, route,
                     time.perf_counter() - t0)
    return out


def _topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest logits, ascending (a deterministic, cache-friendly order)."""
    return torch.sort(torch.topk(logits, k).indices).values.long()
