"""Pipeline throughput: build examples/s and query ms on three workloads; prints a table.

    python benchmarks/pipeline.py                 # (a) digits, (b) tiny GPT-2, (c) 200k-vector index
    python benchmarks/pipeline.py --quick         # smaller (b) and (c), for a smoke run
    python benchmarks/pipeline.py --only a,c      # pick workloads

(a) the bundled digits MLP with the default specs (clamped to the layers);
(b) a random-init GPT-2 config (2 layers, 128 wide, T=128) over synthetic token sequences;
(c) FAISS alone: 200,000 random k=4096 vectors, exact (flat) vs IVF latency and recall@10.
Peak RAM is the process's ru_maxrss (it only grows, so it is cumulative over the rows).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _table import markdown_table  # benchmarks/ is on sys.path when run as a script

ROWS: list[dict] = []


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_build(model, data, loss, out, collate=None, **kw):
    """Build and split the wall time into pass 1 (gradients) and pass 2 (precondition+index)."""
    import grass_index as gi

    marks = {}

    def cb(stage, done, total):
        marks.setdefault(stage, time.perf_counter())
        marks[stage + "_end"] = time.perf_counter()

    t0 = time.perf_counter()
    idx = gi.build_index(model, data, loss, out, collate=collate, progress=cb, **kw)
    total = time.perf_counter() - t0
    p1 = marks.get("sketch_end", t0) - t0
    return idx, total, p1


def query_ms(idx, model, items, loss, collate=None, k=10):
    """(end-to-end ms per query incl. its gradient, FAISS-only ms per query)."""
    idx.query(model, items[:2], loss, k=k, collate=collate)  # warm-up
    t0 = time.perf_counter()
    q = idx.query_sketches(model, items, loss, collate=collate, batch_size=1)
    t1 = time.perf_counter()
    idx.search(q, k)
    t2 = time.perf_counter()
    n = len(items)
    return 1000 * (t2 - t0) / n, 1000 * (t2 - t1) / n


def bench_digits(tmp: Path):
    from grass_index.task import load_task

    t = load_task(None)
    model, data = t.model(), t.train_data()
    idx, total, p1 = timed_build(model, data, t.loss, tmp / "digits")
    qd = t.query_data()
    items = [qd[i] for i in range(50)]
    e2e, search = query_ms(idx, model, items, t.loss)
    ROWS.append(dict(workload=f"(a) digits MLP, n={len(data)}, K={idx.dim}",
                     build=f"{len(data) / total:.0f} ex/s ({len(data) / p1:.0f} ex/s pass 1)",
                     query=f"{e2e:.2f} ms e2e / {search:.3f} ms search", extra="", ram=peak_mb()))


def bench_gpt2(tmp: Path, n: int, projection: str):
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=512, n_positions=128, n_embd=128, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(cfg).eval()
    T = 128
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, cfg.vocab_size, (n, T), generator=g)
    data = torch.utils.data.TensorDataset(toks)

    def loss(m, batch):
        (ids,) = batch
        logits = m(input_ids=ids).logits[:, :-1]
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none")
        return tok.view(ids.shape[0], -1).mean(1)

    idx, total, p1 = timed_build(model, data, loss, tmp / "gpt2", projection=projection,
                                 batch_size=16)
    q = torch.utils.data.TensorDataset(torch.randint(0, cfg.vocab_size, (20, T), generator=g))
    items = [q[i] for i in range(20)]
    e2e, search = query_ms(idx, model, items, loss)
    ROWS.append(dict(workload=f"(b) GPT-2 2x128, T={T}, n={n}, K={idx.dim} ({projection}/layer)",
                     build=f"{n / total:.1f} ex/s ({n / p1:.1f} ex/s pass 1)",
                     query=f"{e2e:.1f} ms e2e / {search:.3f} ms search",
                     extra=f"{len(idx.layout)} layers", ram=peak_mb()))


def bench_faiss(n: int, dim: int, nlist: int, nprobes: list[int], n_queries: int = 100):
    from grass_index.index import VectorIndex, recall_at_k

    rng = np.random.default_rng(0)
    x = np.empty((n, dim), np.float32)
    for lo in range(0, n, 20_000):
        x[lo:lo + 20_000] = rng.standard_normal((min(20_000, n - lo), dim), dtype=np.float32)
    q = rng.standard_normal((n_queries, dim), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64)

    flat = VectorIndex.create(dim, "flat")
    t0 = time.perf_counter()
    flat.add(x, ids)
    add_s = time.perf_counter() - t0
    flat.search(q[:2], 10)
    t0 = time.perf_counter()
    _, exact = flat.search(q, 10)
    batch_ms = 1000 * (time.perf_counter() - t0) / n_queries
    t0 = time.perf_counter()
    for i in range(10):
        flat.search(q[i:i + 1], 10)
    single_ms = 1000 * (time.perf_counter() - t0) / 10
    ROWS.append(dict(workload=f"(c) {n:,} x {dim} random, flat (exact)",
                     build=f"add {n / add_s:,.0f} vec/s",
                     query=f"{single_ms:.1f} ms single / {batch_ms:.2f} ms batched",
                     extra="recall@10 1.000", ram=peak_mb()))
    del flat

    ivf = VectorIndex.create(dim, "ivf", nlist=nlist)
    sample = x[rng.choice(n, size=min(n, 40 * nlist), replace=False)]
    t0 = time.perf_counter()
    ivf.train(sample)
    train_s = time.perf_counter() - t0
    ivf.add(x, ids)
    for nprobe in nprobes:
        ivf.search(q[:2], 10, nprobe=nprobe)
        t0 = time.perf_counter()
        for i in range(n_queries):
            _, got = ivf.search(q[i:i + 1], 10, nprobe=nprobe)
            if i == 0:
                all_got = [got]
            else:
                all_got.append(got)
        ms = 1000 * (time.perf_counter() - t0) / n_queries
        rec = recall_at_k(np.concatenate(all_got), exact, 10)
        ROWS.append(dict(workload=f"(c) ivf nlist={nlist}, nprobe={nprobe}",
                         build=f"train {train_s:.0f} s", query=f"{ms:.2f} ms single",
                         extra=f"recall@10 {rec:.3f}", ram=peak_mb()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller (b) and (c)")
    ap.add_argument("--only", default="a,b,c", help="comma list of workloads: a,b,c")
    ap.add_argument("--gpt2-n", type=int, default=None, help="sequences for (b) (default 5000)")
    ap.add_argument("--gpt2-projection", default="sjlt-1024",
                    help="per-layer projection for (b) (the F_l inverse is k x k)")
    ap.add_argument("--faiss-n", type=int, default=None, help="vectors for (c) (default 200000)")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "a" in only:
            bench_digits(tmp)
            _print()
        if "b" in only:
            bench_gpt2(tmp, args.gpt2_n or (500 if args.quick else 5000), args.gpt2_projection)
            _print()
        if "c" in only:
            n = args.faiss_n or (20_000 if args.quick else 200_000)
            bench_faiss(n, 4096, nlist=64 if args.quick else 256,
                        nprobes=[1, 8, 32] if args.quick else [1, 8, 32, 64])
    _print(final=True)


def _print(final=False):
    if not final:
        print(ROWS[-1], file=sys.stderr, flush=True)
        return
    head = ("workload", "build", "query (top-10)", "notes", "peak RAM MB")
    rows = [(r["workload"], r["build"], r["query"], r["extra"], f"{r['ram']:.0f}") for r in ROWS]
    print(markdown_table(head, rows))

if __name__ == "__main__":
    main()
