"""Gradient sparsity of the tiny GPT under ReLU / GELU / SiLU, and what it does to sketch speed
and LDS. Prints two tables.

    python benchmarks/sparsity.py                       # sparsity + capture speed (~3 min, 2 cores)
    python benchmarks/sparsity.py --lds-subsets 8       # + LDS per activation (8 retrains each)
    python benchmarks/sparsity.py --activations relu,gelu_new --threads 1

For every activation (GPT2Config activation_function) the tiny GPT of examples/tiny_gpt.py is
trained with the same recipe (cached under $GRASS_INDEX_CACHE). Then, over the training set:

* per layer (every Conv1D/Linear the index captures): the fraction of exact zeros and of
  near-zeros (|v| <= 1e-3 * max|v| of that example) in the layer inputs x_t, the output
  gradients Dy_t, and the per-sample gradient G_i = sum_t Dy_t x_t^T (bias column included).
  Only token positions that have a next-token target count: the last real token and the
  padding get Dy = 0 from the loss mask, whatever the activation, and would hide the effect.
* capture speed (training examples/s of GradientSketcher.sketch, best of --repeats) for
  FactGraSS (factored mask + SJLT, never forms G), GraSS on the materialised gradient (mask +
  SJLT) and SJLT on the materialised gradient (the CPU SJLT kernel skips all-zero column blocks,
  so this is where sparsity can pay).
* with --lds-subsets M: LDS of the FactGraSS index against M retrained subset models (seed 0).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import tiny_gpt  # noqa: E402

NEAR = 1e-3
SPECS = {  # name -> (sparsification, projection)
    "FactGraSS": ("random_mask-32*32", "sjlt-1024"),
    "GraSS(materialised)": ("random_mask-4096", "sjlt-1024"),
    "SJLT(materialised)": ("identity", "sjlt-1024"),
}


def _frac(t: torch.Tensor, per_row: bool = True) -> tuple[float, float]:
    """(exact-zero fraction, near-zero fraction) of t; near = |v| <= NEAR * max|v| of its row."""
    t = t.detach().float()
    exact = float((t == 0).float().mean())
    a = t.abs().reshape(t.shape[0], -1) if per_row else t.abs().reshape(1, -1)
    thr = a.amax(dim=1, keepdim=True) * NEAR
    near = float((a <= thr).float().mean())
    return exact, near


def layer_sparsity(model, data) -> list[dict]:
    """Per captured layer: sparsity of x, Dy (at positions with a target) and G_i."""
    from grass_index.capture.layers import select_layers

    layers = select_layers(model)
    ids, mask = tiny_gpt.collate([data[i] for i in range(len(data))])
    has_target = torch.zeros_like(mask, dtype=torch.bool)
    has_target[:, :-1] = mask[:, 1:].bool()  # position t predicts token t+1
    saved: dict[str, dict] = {}
    handles = []
    for layer in layers:
        mod = model.get_submodule(layer.module_name)

        def hook(module, args, output, name=layer.name):
            saved[name] = {"x": args[0].detach()}
            output.register_hook(lambda g: saved[name].__setitem__("dy", g.detach()))

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            tiny_gpt.loss(model, (ids, mask)).sum().backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    rows = []
    sel = has_target
    for layer in layers:
        x, dy = saved[layer.name]["x"], saved[layer.name]["dy"]
        xt, dyt = x[sel], dy[sel]  # [n_tokens, d]
        xz = x * sel[..., None]
        if layer.has_bias:
            xz = torch.cat([xz, sel[..., None].to(x.dtype)], dim=-1)
        G = torch.bmm((dy * sel[..., None]).transpose(1, 2), xz)  # [B, d_out, d_in(+1)]
        rows.append(dict(layer=layer.name, x=_frac(xt), dy=_frac(dyt), g=_frac(G)))
    return rows


def sketch_speed(models: dict, data, repeats: int, threads: int, batch_size: int = 32
                 ) -> dict[str, dict[str, float]]:
    """{activation: {method: examples/s}}, best of `repeats`. The activations are timed
    round-robin inside every repeat, so a noisy (shared) machine slows them all alike.
    "fwd+bwd" is the plain forward + backward of the per-sequence losses (no hooks): the
    floor under every capture; the activation function itself is part of it."""
    from grass_index.capture.layers import select_layers
    from grass_index.capture.sketcher import GradientSketcher

    batches = [tiny_gpt.collate([data[i] for i in range(lo, min(lo + batch_size, len(data)))])
               for lo in range(0, len(data), batch_size)]
    runners = {}
    for act, model in models.items():
        layers = select_layers(model)

        def plain(b, model=model):
            with torch.enable_grad():
                model.zero_grad(set_to_none=True)
                tiny_gpt.loss(model, b).sum().backward()
                model.zero_grad(set_to_none=True)

        runners[act] = {"fwd+bwd": plain}
        for name, (sp, pr) in SPECS.items():
            sk = GradientSketcher(model, layers, sparsification=sp, projection=pr, seed=0,
                                  clamp=True)
            runners[act][name] = lambda b, sk=sk: sk.sketch(b, tiny_gpt.loss)
    best = {act: {name: float("inf") for name in r} for act, r in runners.items()}
    torch.set_num_threads(threads)
    for act, r in runners.items():  # warm-up
        for fn in r.values():
            fn(batches[0])
    for _ in range(repeats):
        for act, r in runners.items():
            for name, fn in r.items():
                t0 = time.perf_counter()
                for b in batches:
                    fn(b)
                best[act][name] = min(best[act][name], time.perf_counter() - t0)
    return {act: {name: len(data) / t for name, t in d.items()} for act, d in best.items()}


def lds_for(act: str, model, m_subsets: int, alpha: float = 0.5) -> tuple[float, float]:
    """(LDS, seconds of ground-truth training) of a FactGraSS index, M subsets x seed 0."""
    import grass_index as gi
    from grass_index.eval import lds, make_subsets, train_ground_truth

    train, query = tiny_gpt.train_data(), tiny_gpt.query_data()
    root = Path(os.environ.get("GRASS_INDEX_CACHE", Path.home() / ".cache" / "grass-index"))
    gt_dir = root / "lds" / f"tiny_gpt_sparsity-{act}-{tiny_gpt._cache_path(act).stem}-m{m_subsets}"

    def train_fn(subset, seed):
        return tiny_gpt.train_model([subset[i] for i in range(len(subset))], seed=seed,
                                    activation=act)

    subsets = make_subsets(len(train), m_subsets, alpha, 0)
    t0 = time.perf_counter()
    gt = train_ground_truth(train_fn, train, query, tiny_gpt.loss, subsets, [0], gt_dir, False,
                            collate=tiny_gpt.collate, tag=f"tiny_gpt-{act}")
    secs = time.perf_counter() - t0
    sp, pr = SPECS["FactGraSS"]
    with tempfile.TemporaryDirectory() as d:
        idx = gi.build_index(model, train, tiny_gpt.loss, Path(d) / "idx", collate=tiny_gpt.collate,
                             sparsification=sp, projection=pr, progress=False)
        scores = idx.score(model, query, tiny_gpt.loss, collate=tiny_gpt.collate)
    mean, _ = lds(scores, gt.subsets, gt.losses)
    return float(mean), secs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--activations", default="relu,gelu_new,silu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lds-subsets", type=int, default=0, help="0: skip LDS")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        # building a FAISS index sets the OpenMP width (honouring OMP_NUM_THREADS), which torch
        # shares: pin both, and re-pin before every timing
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    acts = [a.strip() for a in args.activations.split(",") if a.strip()]
    data = tiny_gpt.train_data()

    summary = []
    per_layer = {}
    models = {}
    for act in acts:
        t0 = time.perf_counter()
        torch.set_num_threads(threads)
        model = models[act] = tiny_gpt.model(act)
        t_model = time.perf_counter() - t0
        q = tiny_gpt.query_data()
        with torch.no_grad():
            qloss = float(tiny_gpt.loss(model, tiny_gpt.collate(list(q))).mean())
            tloss = float(tiny_gpt.loss(model, tiny_gpt.collate(list(data))).mean())
        rows = layer_sparsity(model, data)
        per_layer[act] = rows
        lds_v = lds_s = None
        if args.lds_subsets:
            lds_v, lds_s = lds_for(act, model, args.lds_subsets)
        mean = lambda key, j: float(np.mean([r[key][j] for r in rows]))  # noqa: E731
        summary.append(dict(act=act, train_loss=tloss, query_loss=qloss, model_s=t_model,
                            x0=mean("x", 0), dy0=mean("dy", 0), g0=mean("g", 0), gnear=mean("g", 1),
                            lds=lds_v, lds_s=lds_s))
        print(f"[{act}] done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    speed = sketch_speed(models, data, args.repeats, threads)
    for s in summary:
        s.update(speed[s["act"]])

    print(f"\nPer-layer sparsity (exact zeros / near-zeros |v|<={NEAR:g}*max), tiny GPT "
          f"({tiny_gpt.N_LAYER} layers, d={tiny_gpt.N_EMBD}), {len(data)} training sequences, "
          "token positions with a target only\n")
    hdr = f"{'activation':<10} {'layer':<28} {'x: 0':>7} {'x: ~0':>7} {'Dy: 0':>7} {'Dy: ~0':>7} " \
          f"{'G: 0':>7} {'G: ~0':>7}"
    print(hdr)
    print("-" * len(hdr))
    for act, rows in per_layer.items():
        for r in rows:
            name = r["layer"].replace("transformer.", "")
            print(f"{act:<10} {name:<28} {r['x'][0]:7.1%} {r['x'][1]:7.1%} {r['dy'][0]:7.1%} "
                  f"{r['dy'][1]:7.1%} {r['g'][0]:7.1%} {r['g'][1]:7.1%}")
    print("\nSummary (sparsity = mean over layers; speed = training examples/s of the capture, "
          f"best of {args.repeats},\nactivations timed round-robin; torch threads={threads}; "
          f"{len(data)} sequences, batch 32; fwd+bwd = no capture, the floor)\n")
    cols = ["act", "train_loss", "query_loss", "x0", "dy0", "g0", "gnear", "fwd+bwd"]
    cols += list(SPECS) + (["lds"] if args.lds_subsets else [])
    heads = {"act": "activation", "train_loss": "train loss", "query_loss": "query loss",
             "x0": "x: 0", "dy0": "Dy: 0", "g0": "G: 0", "gnear": "G: ~0",
             "lds": f"LDS (M={args.lds_subsets})"}
    widths = {c: max(10, len(heads.get(c, c))) for c in cols}
    print(" ".join(f"{heads.get(c, c):>{widths[c]}}" for c in cols))
    for s in summary:
        cells = []
        for c in cols:
            v = s[c]
            if c == "act":
                cells.append(f"{v:>{widths[c]}}")
            elif c in ("x0", "dy0", "g0", "gnear"):
                cells.append(f"{v:>{widths[c]}.1%}")
            elif c == "lds":
                cells.append(f"{v:>{widths[c]}.3f}")
            else:
                cells.append(f"{v:>{widths[c]}.2f}" if "loss" in c else f"{v:>{widths[c]}.1f}")
        print(" ".join(cells))


if __name__ == "__main__":
    main()
