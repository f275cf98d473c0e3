"""Attribution quality on the digits MLP: LDS and compression time per method.

    python benchmarks/quality.py            # M=100 subsets x 3 seeds ground truth (cached), all rows
    python benchmarks/quality.py --quick    # M=20 x 1 seed, k=256 only: a smoke run in ~1-2 min

Ground truth (retrained models) is cached under --out and reused by later runs; the first
full run trains M x seeds small MLPs (about a second each on one core). Every method is an
index built with grass_index.build_index and scored with AttributionIndex.score; damping
sweeps reuse the stored sketches via AttributionIndex.reprecondition. Selective-mask rows fit a
mask on training examples only (grass_index.maskfit), write the mask file and build
with build_index(selective_mask=FILE), like `grass-index build --selective-mask FILE`.

The digits MLP has two linear layers, 64(+1 bias)->64 and 64(+1)->10, i.e. 4160 + 650
gradient coordinates, so the sketch dimensions are per layer and the second layer is clamped
to its 650 coordinates whenever k is larger; the table reports the total sketch width K.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grass_index as gi  # noqa: E402
from grass_index.eval import lds, make_subsets, train_ground_truth  # noqa: E402
from grass_index.eval.run import task_train_fn  # noqa: E402

TASK = ROOT / "examples" / "digits.py"


def methods(k: int) -> list[tuple[str, str, str]]:
    """(name, sparsification, projection) at per-layer width k (k a square of a power of 2)."""
    a = int(round(k ** 0.5))                    # LoGra: a*a = k
    return [
        ("Gaussian", f"normal-{k}", "identity"),
        ("Rademacher", f"rademacher-{k}", "identity"),
        ("FJLT", f"fjlt-{k}", "identity"),
        ("SJLT", f"sjlt-{k}", "identity"),
        ("random mask", f"random_mask-{k}", "identity"),
        ("GraSS", f"grass-{k}", "identity"),                      # mask 4k, then SJLT to k
        ("LoGra", f"normal-{a}*{a}", "identity"),
        ("FactGraSS", f"random_mask-{2 * a}*{2 * a}", f"sjlt-{k}"),  # mask 4k, then SJLT to k
    ]


def sketch_seconds(model, train, loss, collate, sparsification, projection, mask=None,
                   batch_size=128) -> float:
    """Wall time to sketch every training gradient (forward + backward + compression)."""
    from grass_index.capture.layers import select_layers
    from grass_index.capture.sketcher import GradientSketcher
    from grass_index.compress import load_selective_mask

    sk = GradientSketcher(model, select_layers(model, None), sparsification=sparsification,
                          projection=projection, seed=0, clamp=True,
                          selective_masks=load_selective_mask(mask) if mask else None)
    batches = [collate([train[i] for i in range(s, min(s + batch_size, len(train)))])
               for s in range(0, len(train), batch_size)]
    sk.sketch(batches[0], loss)  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        sk.sketch(b, loss)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="M=20, 1 seed, k=256 only")
    ap.add_argument("--subsets", type=int, default=100, help="number of subsets M (default 100)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds per subset (default 0,1,2)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--k", default="256,1024", help="per-layer sketch widths (squares)")
    ap.add_argument("--dampings", default="1e-3,1e-2,0.1,1,3", help="relative dampings to sweep (besides the default 0.3)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="cache/work directory")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--no-selective", action="store_true", help="skip the selective-mask rows "
                    "(each needs a mask fit)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this "
                    "tiny MLP on a shared machine)")
    args = ap.parse_args(argv)
    if args.quick:
        args.subsets, args.seeds, args.k, args.dampings = 20, "0", "256", "1e-3,0.1"
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    dampings = [float(d) for d in args.dampings.split(",")]
    out = Path(args.out)
    shutil.rmtree(out / "indexes", ignore_errors=True)  # fresh builds: honest build times

    task = gi.load_task(TASK)
    model, train, query = task.model(), task.train_data(), task.query_data()
    subsets = make_subsets(len(train), args.subsets, args.alpha, 0)
    t0 = time.perf_counter()
    gt = train_ground_truth(task_train_fn(task), train, query, task.loss, subsets, seeds,
                            out / f"gt-m{args.subsets}-a{args.alpha:g}-s0", progress=True,
                            collate=task.collate, tag=task.ref)
    gt_wall = time.perf_counter() - t0
    losses = gt.losses
    # seed-to-seed agreement: how well one seed's losses predict another's (a noise ceiling)
    if len(seeds) > 1:
        ceil = lds_between(gt.losses_per_seed[:, 0], gt.losses_per_seed[:, 1:].mean(1))
    else:
        ceil = float("nan")
    print(f"ground truth: M={args.subsets} subsets x {len(seeds)} seeds, alpha={args.alpha}, "
          f"{len(query)} queries; {gt.seconds.sum():.0f}s of training in total "
          f"({gt.seconds.mean():.2f}s/model), {gt_wall:.0f}s this run; "
          f"seed-vs-rest loss rank agreement {ceil:.3f}", flush=True)

    rows = []

    def evaluate(name, sp, pr, hessian="eFIM", damping=None, group="", k=None, sweep=(),
                 mask=None, fit_s=None, seed=0):
        d = out / "indexes" / f"{sp}__{pr}__{hessian}__s{seed}".replace("*", "x")
        t = time.perf_counter()
        idx = gi.build_index(model, train, task.loss, d, sparsification=sp, projection=pr,
                             hessian=hessian, damping=damping, batch_size=128, seed=seed,
                             progress=False, collate=task.collate, selective_mask=mask)
        build_s = time.perf_counter() - t
        secs = sketch_seconds(model, train, task.loss, task.collate, sp, pr, mask)
        for dmp in (damping, *sweep):
            if dmp is not damping:
                idx.reprecondition(damping=dmp, hessian=hessian)
            scores = idx.score(model, query, task.loss, collate=task.collate)
            mean, per_q = lds(scores, gt.subsets, losses)
            row = dict(group=group, method=name, sparsification=sp, projection=pr, hessian=hessian,
                       damping="default" if dmp is None else dmp, k=k, K=idx.dim, lds=mean,
                       lds_se=float(np.nanstd(per_q) / np.sqrt(np.isfinite(per_q).sum())),
                       sketch_s=secs, build_s=build_s, fit_s=fit_s,
                       damping_used=idx.config.get("damping_used", idx.config.get("damping")))
            rows.append(row)
            print(f"  {group:10s} {name:12s} {sp:22s} {pr:10s} {hessian:8s} "
                  f"damp={row['damping']!s:8s} K={idx.dim:5d} LDS={mean:.4f} ±{row['lds_se']:.4f} "
                  f"sketch={secs:.2f}s build={build_s:.1f}s"
                  + (f" fit={fit_s:.1f}s" if fit_s is not None else ""), flush=True)
        idx.close()

    evaluate("exact (identity)", "identity", "identity", group="ceiling", sweep=dampings)
    evaluate("exact (identity)", "identity", "identity", hessian="identity", group="hessian")
    for k in ks:
        for name, sp, pr in methods(k):
            sweep = dampings if (name in ("SJLT", "FactGraSS") and k == max(ks)) else ()
            evaluate(name, sp, pr, group=f"k={k}", k=k, sweep=sweep)
            if name == "random mask":  # a random mask's LDS varies with its seed: show the spread
                for seed in (1, 2):
                    evaluate(f"random mask (seed {seed})", sp, pr, group=f"k={k}", k=k, seed=seed)
    name, sp, pr = methods(max(ks))[-1]
    evaluate(name, sp, pr, hessian="identity", group="hessian", k=max(ks))

    if not args.no_selective:  # learned masks, through the real pipeline (mask file -> build_index)
        from grass_index.compress import save_selective_mask
        from grass_index.maskfit import fit_selective_mask

        for k in ks:
            a = int(round(k ** 0.5))
            for name, spec_k, sp, pr in [("selective mask", k, f"selective_mask-{k}", "identity"),
                                         ("FactGraSS (selective)", f"{2 * a}*{2 * a}",
                                          f"selective_mask-{2 * a}*{2 * a}", f"sjlt-{k}")]:
                t = time.perf_counter()
                # fit on training examples only (a sample of 768; the query set is never seen)
                masks = fit_selective_mask(model, train, task.loss, spec_k, collate=task.collate,
                                           seed=0)
                fit_s = time.perf_counter() - t
                mask_file = out / "masks" / f"{sp}.pt".replace("*", "x")
                mask_file.parent.mkdir(parents=True, exist_ok=True)
                save_selective_mask(mask_file, masks)
                evaluate(name, sp, pr, group=f"k={k}", k=k, mask=mask_file, fit_s=fit_s)

    print()
    print(markdown(rows, args, gt, ceil))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, subsets=args.subsets, seeds=seeds,
                                                   gt_seconds=float(gt.seconds.sum())), indent=1,
                                              default=str))
    return 0


def lds_between(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over queries of Spearman ρ between two [m, n_query] loss tables."""
    from scipy.stats import spearmanr

    return float(np.nanmean([spearmanr(a[:, q], b[:, q]).statistic for q in range(a.shape[1])]))


def markdown(rows, args, gt, ceil) -> str:
    lines = [f"LDS on digits (MLP 64-64-10, {gt.losses.shape[1]} test queries, M={args.subsets} "
             f"subsets of alpha={args.alpha}, {len(gt.seeds)} seeds each). Sketch time = "
             "forward+backward+compression of all 1437 training gradients, 1 CPU thread.", "",
             "| group | method | sparsification | projection | Hessian | damping | K | LDS | ± s.e. | sketch s | mask fit s |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['method']} | `{r['sparsification']}` | `{r['projection']}` "
                     f"| {r['hessian']} | {r['damping']} | {r['K']} | {r['lds']:.4f} | "
                     f"{r['lds_se']:.4f} | {r['sketch_s']:.3f} | "
                     + (f"{r['fit_s']:.0f} |" if r.get("fit_s") is not None else "|"))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
