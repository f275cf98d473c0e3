"""The exact index scanned from the sketch store against an exact FAISS copy (``flat:faiss``),
over the same stored sketches of a random-init GPT-2 (examples/hf_causal_lm.py, nothing
downloaded): disk, pass 2 (the same refit into each layout, side by side), query latency
(warm, in this process; min of --reps) and whether both return the same top 10.

    PYTHONPATH=$PWD python benchmarks/store_scan.py WORK [--n 64] [--n-layer 12]
        [--projection sjlt-4096] [--tokens 64] [--reps 7]

Two regimes the default choice (index/choice.py ``scans_store``) covers: n ≪ k (GPT-2 small at
n = 64: 48 low-rank layers, 64×64 cores) and n ≫ k (e.g. --n-layer 2 --n 1024 --projection
sjlt-128: 8 dense 128×128 inverses).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt2_task import gpt2_task  # noqa: E402
from _table import markdown_table  # noqa: E402

import grass_index as gi  # noqa: E402


def dir_bytes(path: Path) -> dict[str, int]:
    """Allocated bytes: the store (LMDB + its array files), the FAISS files, the rest."""
    out = dict(store=0, faiss=0, other=0)
    for d, _, files in os.walk(path):
        for f in files:
            p = Path(d) / f
            part = "faiss" if p.suffix == ".faiss" else \
                "store" if "sketches" in p.relative_to(path).parts else "other"
            out[part] += os.stat(p).st_blocks * 512
    return out


def timed(fn, reps: int) -> float:
    fn()  # warm: the preconditioner / FAISS file mapped, pages cached
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--projection", default="sjlt-4096")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    task = gpt2_task(work, args.n + 8, args.tokens, args.n_layer)
    model, data = task.model(), task.train_data()
    train = torch.utils.data.Subset(data, range(args.n))
    queries = [data[i] for i in range(args.n, args.n + 8)]
    scan_dir, faiss_dir = work / "scan", work / "faiss"
    for d in (scan_dir, faiss_dir):
        shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    built = gi.build_index(model, train, task.loss, scan_dir, collate=task.collate,
                           projection=args.projection, batch_size=args.batch_size,
                           progress=False)
    build_s = time.perf_counter() - t
    shutil.copytree(scan_dir, faiss_dir)
    # pass 2 again over the same sketches into each layout, alternating (the Fisher is cached)
    refit = {"scan": [], "faiss": []}
    for damping in (0.1, 0.3, 1.0):
        for name, path, index in (("scan", scan_dir, "flat"), ("faiss", faiss_dir, "flat:faiss")):
            t = time.perf_counter()
            gi.open_index(path).reprecondition(damping=damping, index=index)
            refit[name].append(time.perf_counter() - t)
    scan, copy = gi.open_index(scan_dir), gi.open_index(faiss_dir)
    assert scan.settings.held_in_store and not copy.settings.held_in_store
    q = scan.query_sketches(model, queries, task.loss, collate=task.collate)
    same = all([i for i, _ in a] == [i for i, _ in b]
               for a, b in zip(scan.search(q, 10), copy.search(q, 10)))
    sketches = 4 * args.n * scan.dim
    rows = []
    for name, idx in (("store scan", scan), ("FAISS copy", copy)):
        disk = dir_bytes(idx.path)
        rows.append([name, f"{sum(disk.values()) / 1e6:,.1f}", f"{disk['faiss'] / 1e6:,.1f}",
                     f"{sum(disk.values()) / sketches:.2f}×",
                     f"{min(refit['scan' if idx is scan else 'faiss']):.2f}",
                     f"{timed(lambda: idx.search(q[:1], 10), args.reps) * 1e3:.1f}",
                     f"{timed(lambda: idx.search(q, 10), args.reps) * 1e3:.1f}"])
    forms = sorted(set(scan.config["preconditioner"]["forms"].values()))
    print(f"GPT-2 ({args.n_layer} blocks), n = {args.n}, T = {args.tokens}, K = {scan.dim:,} "
          f"({len(scan.layout)} layers, forms {forms}); sketches {sketches / 1e6:,.1f} MB; "
          f"first build {build_s:.1f} s; same top-10 ids for all 8 queries: {same}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(markdown_table(["exact index", "disk MB", "of it FAISS MB", "× sketches",
                          "pass 2 (refit) s, min of 3", "query ms (1)", "query ms (8)"], rows))


if __name__ == "__main__":
    main()
