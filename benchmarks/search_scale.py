"""Two-stage search (search sketch in FAISS + exact re-rank from the store) vs exact search, at
LM width K = 196,608 (GPT-2 small, 48 layers × sjlt-4096) on n simulated vectors.

    PYTHONPATH=$PWD python3 benchmarks/search_scale.py [--n 20000] [--dir /tmp/x]

The vectors are low-rank signal plus noise (rank 32, noise variance 1 per coordinate against
32 for the signal): gradients of one model share a few directions, which is what makes a top-k
meaningful. They stand for preconditioned sketches (identity preconditioner). Exact search is
what ``score`` does: stream every stored row and take the top k. n = 100k would need 79 GB of
disk; --n defaults to the largest that fits in 40% of the free disk, capped at 20k.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from grass_index.index import SearchSketch, SketchedIndex, VectorIndex, recall_at_k
from grass_index.index.search_sketch import DEFAULT_DIM, DEFAULT_RERANK
from grass_index.indexdir.stored import store_rerank
from grass_index.precondition import Preconditioner
from grass_index.store import SketchStore

K, LAYERS, RANK, BLOCK = 196_608, 48, 32, 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--dims", default=f"1024,2048,{DEFAULT_DIM}")
    ap.add_argument("--rerank", type=int, default=DEFAULT_RERANK)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    free = shutil.disk_usage(root).free
    n = args.n or int(min(20_000, 0.4 * free / (4 * K)))
    print(f"n = {n:,} vectors of K = {K:,} ({n * K * 4 / 1e9:.1f} GB; free disk "
          f"{free / 1e9:.0f} GB; 100k would need {1e5 * K * 4 / 1e9:.0f} GB)")
    try:
        run(root, n, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, n: int, args):
    rng = np.random.default_rng(0)
    U = rng.standard_normal((RANK, K)).astype(np.float32)
    sample = lambda m: (rng.standard_normal((m, RANK)).astype(np.float32) @ U  # noqa: E731
                        + rng.standard_normal((m, K), dtype=np.float32))
    dims = [int(d) for d in args.dims.split(",")]
    sketches = {d: SearchSketch(K, d, seed=0) for d in dims}
    faiss = {d: SketchedIndex(VectorIndex.create(d), s, args.rerank) for d, s in sketches.items()}
    t = time.time()
    with SketchStore.create(root / "sketches", dim=K, meta={}) as st:
        for b, lo in enumerate(range(0, n, BLOCK)):
            rows = sample(min(BLOCK, n - lo))
            st.put_block(b, lo, rows)
            for idx in faiss.values():
                idx.add(rows, np.arange(lo, lo + len(rows)))
    print(f"wrote the store and {len(dims)} sketch indexes in {time.time() - t:.0f} s")
    Q = sample(args.queries)
    layout = {str(i): K // LAYERS for i in range(LAYERS)}
    pre = Preconditioner.fit({}, layout, hessian="identity")
    k = 10
    with SketchStore.open(root / "sketches") as st:
        t = time.time()
        best = np.full((len(Q), k), -np.inf, np.float32)
        ids = np.zeros((len(Q), k), np.int64)
        for start, rows in st.iter_blocks():  # what `score` does: every row, exactly
            s = Q @ rows.T
            allv = np.concatenate([best, s], 1)
            alli = np.concatenate([ids, np.broadcast_to(np.arange(start, start + len(rows)),
                                                        s.shape)], 1)
            top = np.argsort(-allv, 1)[:, :k]
            best, ids = np.take_along_axis(allv, top, 1), np.take_along_axis(alli, top, 1)
        exact_s = (time.time() - t) / len(Q)
        print(f"exact (stream the store): {exact_s * 1e3:.0f} ms per query")
        print(f"{'sketch d':>9}{'R':>4}{'recall@10':>11}{'ms/query':>10}{'speed-up':>10}"
              f"{'FAISS bytes/vector':>20}")
        for d, idx in faiss.items():
            two = idx.with_rerank(store_rerank(st, pre))
            two.search(Q[:1], k)  # warm
            t = time.time()
            _, got = two.search(Q, k)
            s = (time.time() - t) / len(Q)
            r = recall_at_k(got, ids, k)
            print(f"{d:>9}{args.rerank:>4}{r:>11.3f}{s * 1e3:>10.0f}{exact_s / s:>9.0f}x"
                  f"{4 * d:>20,}")


if __name__ == "__main__":
    main()
