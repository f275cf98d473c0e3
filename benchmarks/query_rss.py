"""Memory of a query's preconditioning where the low-rank form holds many rows (n near k/2).

    PYTHONPATH=$PWD python3 benchmarks/query_rss.py [--n 2048] [--layers 8] [--reps 3]

Builds (once, in --work) an index of an MLP whose ``--layers`` layers are sketched at k = 4096
(``random_mask-64*64``, identity projection) over n training examples, so every layer is kept
in the low-rank form over the n stored rows. Then, each in a fresh process, ``--reps`` times
alternating: open the index and precondition one query sketch (what a two-stage search's
re-rank does), either streamed (the rows read block by block, twice) or held (the rows read
whole into memory and kept, as before). Prints the process's peak RSS (VmHWM), its anonymous
RSS at its peak during the query (sampled every 2 ms) and after it (what stays held), and the
file-backed RSS (LMDB's mapped pages, the rows and the memory-mapped cores: page cache,
reclaimable and shared between processes, counted in VmHWM alike), min over runs; the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, threading, time
import numpy as np
import grass_index as gi
from grass_index.precondition import preconditioner as pre_mod

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out

peak_anon = [0]
done = threading.Event()

def sample():  # the peak of anonymous RSS (VmHWM also counts LMDB's mapped file pages)
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
        time.sleep(0.002)

mode = sys.argv[2]
if mode == "held":
    pre_mod.STREAM_ROWS = 0  # every batch reads the rows whole and keeps them (the old way)
idx = gi.open_index(sys.argv[1])
pre = idx.preconditioner
before = status()
q = np.random.default_rng(0).standard_normal((1, pre.dim)).astype(np.float32)
sampler = threading.Thread(target=sample)
sampler.start()
t = time.perf_counter()
out = pre.apply(q)
wall = time.perf_counter() - t
done.set()
sampler.join()
after = status()
after["peak_anon"] = max(peak_anon[0], after["RssAnon"])
print("RESULT " + json.dumps(dict(before=before, after=after, wall=wall,
                                  checksum=float(np.abs(out).sum()),
                                  forms=sorted({f.kind for f in pre.forms.values()}))))
"""


def build(work: Path, n: int, layers: int) -> Path:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import grass_index as gi

    out = work / "idx"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(128, 128), nn.Tanh())
                            for _ in range(layers)]).eval()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 128, generator=g),
                                          torch.randint(0, 128, (n,), generator=g))

    def loss(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y, reduction="none")

    gi.build_index(model, data, loss, out, sparsification="random_mask-64*64",
                   projection="identity", batch_size=64, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/query_rss")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    idx = build(work, args.n, args.layers)
    runs: dict[str, list] = {"held": [], "streamed": []}
    for _ in range(args.reps):
        for mode in runs:
            p = subprocess.run([sys.executable, "-c", CHILD, str(idx), mode],
                               capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(p.stdout.split("RESULT ", 1)[1]))
    assert len({r["checksum"] for rs in runs.values() for r in rs}) <= 2  # same scores
    k = 4096
    rows = args.n * k * args.layers * 4
    print(f"load average {os.getloadavg()[0]:.1f}; n = {args.n}, k = {k} per layer x "
          f"{args.layers} layers (stored rows {rows / 1e6:.0f} MB); forms "
          f"{runs['held'][0]['forms']}; min over {args.reps} fresh processes each")
    print(f"{'':10}{'peak RSS':>10}{'+ by query':>12}{'anon peak':>11}{'anon after':>12}"
          f"{'file after':>12}{'apply s':>9}")
    for mode, rs in runs.items():
        def m(f):
            return min(f(r) for r in rs) / 1e6
        print(f"{mode:10}{m(lambda r: r['after']['VmHWM']):9.0f}M"
              f"{m(lambda r: r['after']['VmHWM'] - r['before']['VmHWM']):11.0f}M"
              f"{m(lambda r: r['after']['peak_anon']):10.0f}M"
              f"{m(lambda r: r['after']['RssAnon']):11.0f}M{m(lambda r: r['after']['RssFile']):11.0f}M"
              f"{min(r['wall'] for r in rs):9.3f}")
    h, s = runs["held"], runs["streamed"]
    def ratio(key, minus=None):
        def v(rs):
            return min(r["after"][key] - (r["before"][minus] if minus else 0) for r in rs)
        return v(s) / v(h)
    print(f"streamed / held: peak RSS {ratio('VmHWM'):.2f}, anonymous RSS at peak "
          f"{ratio('peak_anon'):.2f} (the query's own part: {ratio('peak_anon', 'RssAnon'):.2f})"
          f", after {ratio('RssAnon'):.2f} (the query's own part: "
          f"{ratio('RssAnon', 'RssAnon'):.2f})")
    print(json.dumps(dict(runs=runs, load=os.getloadavg())))


if __name__ == "__main__":
    main()
