"""Store and index throughput: disk bytes/row, write/read MB/s, search ms, IVF recall@10.

    python benchmarks/store_index.py [--rows 20000] [--dim 4096] [--block 32]
"""
import argparse
import tempfile
import time

import numpy as np

from grass_index.index import VectorIndex, recall_at_k
from grass_index.store import SketchStore


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--queries", type=int, default=100)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((64, a.dim)).astype(np.float32)
    block = lambda b: (centers[rng.integers(0, 64, a.block)]  # noqa: E731
                       + rng.standard_normal((a.block, a.dim), dtype=np.float32))
    nb = a.rows // a.block
    with tempfile.TemporaryDirectory() as d:
        blocks = [block(b) for b in range(nb)]
        t = time.perf_counter()
        with SketchStore.create(d + "/s", dim=a.dim, meta={}) as s:
            for b in range(nb):
                s.put_block(b, b * a.block, blocks[b])
            info = s.describe()
        tw = time.perf_counter() - t
        raw = info["raw_row_bytes"]
        with SketchStore.open(d + "/s") as r:
            t = time.perf_counter()
            x = np.concatenate([rows for _, rows in r.iter_blocks()])
            tr = time.perf_counter() - t
            t = time.perf_counter()
            r.get_rows(rng.integers(0, len(x), 1000))
            tg = time.perf_counter() - t
        print(f"store  dim={a.dim} block={a.block}: {info['disk_bytes'] / len(x):.0f} B/row on disk "
              f"({info['disk_bytes'] / raw:.4f}x raw), write {raw / tw / 1e6:.0f} MB/s "
              f"({nb / tw:.0f} commits/s), read {raw / tr / 1e6:.0f} MB/s, "
              f"get_rows 1000 random: {tg * 1e3:.1f} ms")
        q = x[rng.integers(0, len(x), a.queries)] + rng.standard_normal(
            (a.queries, a.dim), dtype=np.float32)
        ids = np.arange(len(x))
        flat = VectorIndex.create(a.dim)
        flat.add(x, ids)
        t = time.perf_counter()
        _, exact = flat.search(q, 10)
        tf = (time.perf_counter() - t) / a.queries
        t = time.perf_counter()
        flat.search(q[:1], 10)
        t1 = time.perf_counter() - t
        print(f"flat   n={len(x)}: {tf * 1e3:.2f} ms/query batched ({a.queries}), "
              f"{t1 * 1e3:.2f} ms single query")
        ivf = VectorIndex.create(a.dim, "ivf")
        ivf.train(x[rng.permutation(len(x))[: min(len(x), 10000)]])
        ivf.add(x, ids)
        for p in sorted({1, 4, ivf.nprobe, 2 * ivf.nprobe}):
            t = time.perf_counter()
            _, got = ivf.search(q, 10, nprobe=p)
            ti = (time.perf_counter() - t) / a.queries
            print(f"ivf    nlist={ivf.nlist} nprobe={p}: {ti * 1e3:.2f} ms/query, "
                  f"recall@10 {recall_at_k(got, exact, 10):.3f}")


if __name__ == "__main__":
    main()
