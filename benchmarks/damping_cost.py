"""What damping "auto" (the default) costs at fit time: every eigenvalue of each dense layer's
Fisher (n ≥ k), against the rest of pass 2 and the build, at GPT-2 small's size.

    python benchmarks/damping_cost.py [--k 4096] [--rows 1,4] [--layers 48] [--no-pass1]

Per dense layer (one k × k Fisher from n = rows × k sketches, spectrum decaying like real
gradients'), CPU seconds (process time, one BLAS thread: ratios that hold on a loaded machine;
min of --reps runs) of each part of pass 2 through the library's own code:

  * Fisher: the float32 GEMMs pass 1 accumulates Σ ĝĝᵀ with (FisherAccumulator),
  * fit 0.3: a relative damping's fit (Cholesky + inverse + Lanczos for `info`'s placement),
  * fit auto: damping "auto" — the same plus every eigenvalue, by precondition/eigen.py
    (torch.linalg.eigvalsh) and, for comparison, by scipy's eigvalsh (before),
  * apply: preconditioning the n stored rows (the vectors FAISS then holds).

Then the totals for --layers such layers (GPT-2 small: 48 linear layers, each sketched to
4096), and, unless --no-pass1, pass 1's CPU time per example of GPT-2 small (random init,
T = 64, default specs, measured on a 16-example build, one thread) to put the extra cost
against a whole build of n = rows × k examples.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import markdown_table  # noqa: E402
from grass_index.precondition import FisherAccumulator, Preconditioner  # noqa: E402
from grass_index.precondition import eigen  # noqa: E402
from grass_index.precondition import preconditioner as pre_mod  # noqa: E402


def cpu(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def rows_like_gradients(n: int, k: int, seed: int = 0) -> np.ndarray:
    """n sketches whose Fisher has a power-law spectrum (σ_i ∝ i^-1.4) in a random basis."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((k, k)))[0]
    scale = np.arange(1, k + 1) ** -0.7
    return ((rng.standard_normal((n, k)) * scale) @ basis.T).astype(np.float32)


def layer_costs(k: int, n: int, reps: int) -> dict:
    G = rows_like_gradients(n, k)
    acc = FisherAccumulator({"l": k})
    t = {"Fisher": cpu(lambda: FisherAccumulator({"l": k}).update(G), reps)}
    acc.update(G)
    F = acc.fisher("l")

    def fit(damping, reference=False):
        """reference: scipy's eigvalsh, what "auto" used before, in place of eigen's."""
        if reference:
            pre_mod._eigenvalues = lambda a: eigen.eigenvalues(a, reference=True)
        try:
            return Preconditioner.fit_layers({"l": k}, damping=damping, n=n,
                                             take_fisher=lambda name: F.copy())
        finally:
            pre_mod._eigenvalues = eigen.eigenvalues
    t["fit 0.3"] = cpu(lambda: fit(0.3), reps)
    t["fit auto"] = cpu(lambda: fit("auto"), reps)
    t["fit auto, scipy eigvalsh"] = cpu(lambda: fit("auto", reference=True), reps)
    pre = fit("auto")
    t["apply"] = cpu(lambda: pre.apply_layer("l", G), reps)
    lam_two, lam_scipy = pre.damping_used["l"], None
    lam_scipy = fit("auto", reference=True).damping_used["l"]
    t["λ agreement"] = abs(lam_two - lam_scipy) / lam_scipy
    return t


def pass1_per_example() -> float:
    """CPU seconds per example of GPT-2 small's pass 1 (default specs, T = 64)."""
    import torch

    import grass_index as gi
    from benchmarks._gpt2_task import gpt2_task

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        task = gpt2_task(Path(work), 16, 64)
        t0 = time.process_time()
        gi.build_index(task.model(), task.train_data(), task.loss, Path(work) / "idx",
                       progress=False, batch_size=8, collate=task.collate, workers=0)
        return (time.process_time() - t0) / 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rows", default="1,4", help="n / k values (dense layers need n ≥ k)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-pass1", action="store_true")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}", flush=True)
    per_ex = None if args.no_pass1 else pass1_per_example()
    if per_ex is not None:
        print(f"pass 1, GPT-2 small (T = 64, default specs): {per_ex:.2f} CPU s per example",
              flush=True)
    rows, L = [], args.layers
    for m in (int(x) for x in args.rows.split(",")):
        n = m * args.k
        t = layer_costs(args.k, n, args.reps)
        p2 = t["Fisher"] + t["fit 0.3"] + t["apply"]
        extra, before = t["fit auto"] - t["fit 0.3"], t["fit auto, scipy eigvalsh"] - t["fit 0.3"]
        build = None if per_ex is None else per_ex * n + L * p2
        rows.append([f"{args.k}", f"{n}", f"{t['Fisher']:.2f}", f"{t['fit 0.3']:.2f}",
                     f"{t['fit auto']:.2f}", f"{t['fit auto, scipy eigvalsh']:.2f}",
                     f"{t['apply']:.2f}", f"{L * p2:.0f}",
                     f"+{L * extra:.0f} (+{extra / p2:.0%}; eigvalsh: +{before / p2:.0%})",
                     "—" if build is None else f"{build:.0f} (+{L * extra / build:.1%})",
                     f"{t['λ agreement']:.1e}"])
        print(f"n = {n} done, load {os.getloadavg()}", file=sys.stderr, flush=True)
    print(f"\nCPU seconds per dense layer (one BLAS thread, min of {args.reps}); totals for "
          f"{L} layers; load average {os.getloadavg()}\n")
    print(markdown_table(["k", "n", "Fisher", "fit 0.3", "fit auto", "fit auto (scipy "
                          "eigvalsh)", "apply", f"pass 2, {L} layers (0.3)",
                          "auto's extra", "build (0.3), with pass 1", "λ eigen vs scipy"],
                         rows))


if __name__ == "__main__":
    main()
