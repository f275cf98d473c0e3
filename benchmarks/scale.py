"""Scaling: (a) build throughput with 1 vs 2 processes on CPU; (b) a simulated 1,000,000-example
index (random sketches, k=1024) served from float16 and float32 FAISS indexes. Prints tables.

    python benchmarks/scale.py                       # both, full size (~20 min on 2 cores)
    python benchmarks/scale.py --only processes --n-seq 400     # smoke run of (a)
    python benchmarks/scale.py --only million --n 50000         # smoke run of (b)

(a) One task (a random-init GPT-2, 2 layers x 128, T=128, random tokens, sjlt-1024 per layer)
    built by a small driver script three ways, one after the other on the same machine: one
    process with 1 thread, one process with 2 threads, and `torchrun --nproc_per_node=2` with 1
    thread per rank (gloo; every rank sketches half and sums its Fisher, the sums are
    all-reduced, rank 0 merges and indexes). Wall time includes start-up, so its ratio is what
    a user sees; pass 1 (sketching) is also shown alone. The torchrun build is checked to hold
    the same sketches as the one-process build.
(b) The real pass 2 (`pipeline.pass2.finish`: Fisher from the store, preconditioner, FAISS, recall@10) over a
    store of n random sketches: 8 layers x 128 (k=1024), Gaussian rows with per-layer scales
    and a log-normal per-example norm, in blocks of 256 rows. Each phase runs in its own
    process so its peak RSS (ru_maxrss) is its own. Queries are 100 held-out random sketches
    of the same distribution; recall@10 is the one the build measured and recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from _table import markdown_table  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
LAYERS, K_LAYER, BLOCK = 8, 128, 256


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def du_mb(path: Path) -> float:
    """Allocated size on disk (LMDB's file is sparse until written)."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files) / 2**20


# ----------------------------------------------------------------------------- (a) processes

TASK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel
    N, T, V = {n}, 128, 512

    def model():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=128, n_layer=2,
                                          n_head=4)).eval()

    def train_data():
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.TensorDataset(torch.randint(0, V, (N, T), generator=g))

    def loss(m, batch):
        (ids,) = batch
        logits = m(input_ids=ids).logits[:, :-1]
        tok = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
        return tok.view(ids.shape[0], -1).mean(1)
""")
DRIVER = textwrap.dedent("""
    import json, os, sys, time
    t0 = time.perf_counter()
    import grass_index as gi
    from grass_index.task import load_task

    task = load_task(sys.argv[1])
    marks = {}

    def progress(stage, done, total):
        marks.setdefault(stage, time.perf_counter() - t0)
        marks[stage + "_end"] = time.perf_counter() - t0

    model, data = task.model(), task.train_data()
    start = time.perf_counter() - t0
    gi.build_index(model, data, task.loss, sys.argv[2], sparsification="random_mask-64*64",
                   projection="sjlt-1024", batch_size=16, task=task.ref, progress=progress)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(dict(start=start, sketched=marks["sketch_end"],
                              total=time.perf_counter() - t0)))
""")


def _run(cmd, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]), wall=wall)


def bench_processes(tmp: Path, n: int) -> list[list]:
    """Wall time of each way, and its split: start-up (imports, model, data), pass 1 (the
    slowest rank's sketching), the rest (Fisher all-reduce, merge, pass 2, exit)."""
    task, driver = tmp / "gpt2_task.py", tmp / "driver.py"
    task.write_text(TASK.format(n=n))
    driver.write_text(DRIVER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", "--master_port=29533"]
    ways = [("1 process x 1 thread", [], 1, "p1t1"), ("1 process x 2 threads", [], 2, "p1t2"),
            ("torchrun 2 ranks x 1 thread", torchrun, 1, "tr2")]
    runs = {name: _run([*(pre or [sys.executable]), str(driver), str(task), str(tmp / out)],
                       threads) for name, pre, threads, out in ways}
    _check_same_sketches(tmp / "p1t2", tmp / "tr2")
    base = runs["1 process x 1 thread"]
    rows = []
    for name, r in runs.items():
        p1 = r["sketched"] - r["start"]
        rows.append([name, f"{r['wall']:.1f}", f"{base['wall'] / r['wall']:.2f}x",
                     f"{r['start']:.1f}", f"{p1:.1f} ({n / p1:.0f} ex/s)",
                     f"{(base['sketched'] - base['start']) / p1:.2f}x",
                     f"{r['wall'] - r['sketched']:.1f}"])
    return rows


def _check_same_sketches(a: Path, b: Path) -> None:
    from grass_index.store import SketchStore

    with SketchStore.open(a / "sketches") as sa, SketchStore.open(b / "sketches") as sb:
        for (s1, r1), (s2, r2) in zip(sa.iter_blocks(), sb.iter_blocks()):
            if s1 != s2 or not np.allclose(r1, r2, rtol=1e-4, atol=1e-6 * np.abs(r1).max()):
                sys.exit(f"the torchrun build's sketches differ from one process's at id {s1}")


# ----------------------------------------------------------------------------- (b) 1M index

def _sketches(rng, rows: int) -> np.ndarray:
    x = rng.standard_normal((rows, LAYERS * K_LAYER), dtype=np.float32)
    x *= np.repeat(np.float32(10.0) ** -np.arange(LAYERS, dtype=np.float32) / 2, K_LAYER)
    x *= rng.lognormal(0.0, 1.0, (rows, 1)).astype(np.float32)
    return x


def phase_write(out: Path, n: int) -> dict:
    from grass_index.indexdir.record import claim_out_dir
    from grass_index.indexdir.files import FORMAT_VERSION, STORE_DIR
    from grass_index.store import SketchStore

    layout = {f"layer{i}": K_LAYER for i in range(LAYERS)}
    build = dict(format=FORMAT_VERSION, sparsification="simulated", projection="simulated",
                 seed=0, layers=None, layer_dims={}, layout=layout, dim=LAYERS * K_LAYER,
                 batch_size=BLOCK, n_train=n, model_hash="simulated", data_hash="simulated",
                 sketch_fingerprint="simulated")
    claim_out_dir(out, build)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with SketchStore.create(out / STORE_DIR, dim=build["dim"], meta=build) as store:
        for b, lo in enumerate(range(0, n, BLOCK)):
            store.put_block(b, lo, _sketches(rng, min(BLOCK, n - lo)))
    return dict(seconds=time.perf_counter() - t0, disk_mb=du_mb(out / STORE_DIR),
                peak_mb=peak_mb())


def phase_index(out: Path, spec: str) -> dict:
    import grass_index as gi
    from grass_index.indexdir.files import BUILD_FILE, STORE_DIR
    from grass_index.pipeline.pass2 import finish
    from grass_index.store import SketchStore

    build = json.loads((out / BUILD_FILE).read_text())
    stages: dict[str, float] = {}

    def progress(stage, done, total):
        stages.setdefault(stage, time.perf_counter())

    t0 = time.perf_counter()
    with SketchStore.open(out / STORE_DIR, readonly=False) as store:
        had_fisher = bool(store.get_meta("fisher_done", False))
        cfg = finish(out, store, build, {}, gi.IndexOptions(hessian="eFIM", index=spec),
                     task=None, progress=progress)
    secs = time.perf_counter() - t0
    fisher_s = (stages.get("index", t0) - stages["fisher"]) if "fisher" in stages else 0.0
    idx = gi.open_index(out)
    return dict(seconds=secs, fisher_seconds=fisher_s, fisher_cached=had_fisher,
                disk_mb=du_mb(out / cfg["index_file"]), peak_mb=peak_mb(),
                recall=cfg["index"]["recall"], nlist=cfg["index"]["nlist"],
                nprobe=cfg["index"]["nprobe"], ntotal=idx.vindex.ntotal)


def phase_query(out: Path, mmap: bool) -> dict:
    import torch

    import grass_index as gi

    t0 = time.perf_counter()
    idx = gi.open_index(out, mmap=mmap)
    idx.vindex  # load the FAISS file (and the preconditioner lazily when needed)
    load_s = time.perf_counter() - t0
    q = torch.from_numpy(_sketches(np.random.default_rng(1), 100))
    idx.search(q[:1], 10)  # warm-up
    t0 = time.perf_counter()
    for i in range(10):
        idx.search(q[i:i + 1], 10)
    single_ms = 1000 * (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    idx.search(q, 10)
    batch_ms = 1000 * (time.perf_counter() - t0) / len(q)
    return dict(load_s=load_s, single_ms=single_ms, batch_ms=batch_ms, peak_mb=peak_mb())


def _phase(*args) -> dict:
    res = subprocess.run([sys.executable, __file__, "--phase", *map(str, args)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"phase {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_million(tmp: Path, n: int, specs: list[str]) -> tuple[list[list], list[str]]:
    out = tmp / "million"
    w = _phase("write", out, n)
    notes = [f"store: {n:,} x {LAYERS * K_LAYER} float32 sketches written in {w['seconds']:.0f} s "
             f"({n / w['seconds']:,.0f} rows/s), {w['disk_mb'] / 1024:.2f} GiB on disk "
             f"({w['disk_mb'] * 2**20 / (n * LAYERS * K_LAYER * 4):.3f}x raw), peak RSS "
             f"{w['peak_mb']:.0f} MB"]
    rows = []
    for spec in specs:
        b = _phase("index", out, spec)
        q = _phase("query", out, 0)
        qm = _phase("query", out, 1)
        rec = b["recall"]
        fisher = ("cached" if b["fisher_cached"] else f"{b['fisher_seconds']:.0f} s")
        rows.append([spec, f"{b['seconds']:.0f} s (Fisher {fisher})",
                     f"{b['disk_mb'] / 1024:.2f} GiB",
                     f"{rec['recall']:.3f}" + (f" (nprobe {b['nprobe']}/{b['nlist']})"
                                               if b["nlist"] else ""),
                     f"{q['single_ms']:.1f} / {q['batch_ms']:.2f}",
                     f"{q['load_s']:.1f} s / {qm['load_s']:.2f} s",
                     f"{b['peak_mb']:.0f} / {q['peak_mb']:.0f} / {qm['peak_mb']:.0f}"])
    return rows, notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="processes,million")
    ap.add_argument("--n-seq", type=int, default=3000, help="sequences for (a)")
    ap.add_argument("--n", type=int, default=1_000_000, help="examples for (b)")
    ap.add_argument("--specs", default="flat,flat:fp16,ivf:fp16", help="indexes for (b)")
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)  # internal: one phase of (b)
    args = ap.parse_args(argv)
    if args.phase:
        what, out, extra = args.phase[0], Path(args.phase[1]), args.phase[2]
        res = {"write": lambda: phase_write(out, int(extra)),
               "index": lambda: phase_index(out, extra),
               "query": lambda: phase_query(out, bool(int(extra)))}[what]()
        print(json.dumps(res))
        return
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="grass-scale-"))
    try:
        if "processes" in only:
            rows = bench_processes(tmp, args.n_seq)
            print(f"\n(a) build, GPT-2 2x128 T=128, n={args.n_seq}, sjlt-1024/layer, "
                  f"{os.cpu_count()} CPUs\n")
            print(markdown_table(["how", "wall s", "vs 1x1", "start-up s", "pass 1 s",
                                  "pass 1 vs 1x1", "rest s"], rows))
        if "million" in only:
            rows, notes = bench_million(tmp, args.n, args.specs.split(","))
            print(f"\n(b) simulated index, n={args.n:,}, k={LAYERS * K_LAYER} "
                  f"({LAYERS} layers x {K_LAYER}), {os.cpu_count()} CPUs\n")
            print("\n".join(notes) + "\n")
            print(markdown_table(
                ["index", "pass 2 (build)", "index file", "recall@10",
                 "query ms single / batched(100)", "load: read / mmap",
                 "peak RSS MB build / query / mmap query"], rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
