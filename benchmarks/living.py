"""What changing a living index costs against a rebuild (grass_index/living/).

    python benchmarks/living.py                    # n = 2000, 8000; m = 64, 512
    python benchmarks/living.py --n 4000 --m 128 --repeat 3

For each n (examples indexed) and m (examples added, or removed), side by side in one process:
a fresh build over n + m (the rebuild an add replaces), `add_examples` of the m new ones to an
index of n, a fresh build over n − m and `remove_examples` of m ids. Each time is the minimum
of ``--repeat`` runs. An MLP (64→128→64→10) on random data, FactGraSS with sjlt-256 per layer
(K = 768, every layer dense: n ≥ k), an exact index of each layout (--index): ``flat``, by
default scanned from the store (its inverses are under a quarter of the rows: index/choice.py),
and ``flat:faiss``, a FAISS copy of every preconditioned vector.

The add's time is split by its stages (from the progress callback): pass 1 (the m new rows,
after an O(n) check of every indexed example's fingerprint and block checksum), the refit
(Fisher sums updated from the cache: O(m·k²); the damped inverse: O(k³), independent of n),
and the index: for a FAISS copy every row re-preconditioned (O(n·K·k), since a refit changes
every stored vector); for the store scan one read of the rows (their saturated blocks and the
recall queries' exact lists: O(n·K)).
Prints a markdown table of ratios and the load average beside it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grass_index as gi  # noqa: E402
from _table import markdown_table  # noqa: E402

SPECS = dict(sparsification="random_mask-128*128", projection="sjlt-256", batch_size=32)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10)).eval()


def data(n):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 64, generator=g),
                                          torch.randint(0, 10, (n,), generator=g))


def loss(m, batch):
    x, y = batch
    return F.cross_entropy(m(x), y, reduction="none")


def build(out, d, index="flat"):
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    gi.build_index(model(), d, loss, out, progress=False, workers=0, index=index, **SPECS)
    return time.perf_counter() - t0


def add(tmp: Path, n: int, m: int, index: str):
    """(seconds of the add, {stage: seconds}) of m examples added to an index of n."""
    out = tmp / "add"
    build(out, data(n + m).__class__(*[t[:n] for t in data(n + m).tensors]), index)
    marks = []
    t0 = time.perf_counter()
    gi.add_examples(out, model(), data(n + m), loss, workers=0,
                    progress=lambda stage, done, total: marks.append((stage,
                                                                      time.perf_counter())))
    total = time.perf_counter() - t0
    first = {}
    for stage, t in marks:
        first.setdefault(stage, t)
    stages = dict(pass1=first.get("fisher", first.get("index", t0 + total)) - t0,
                  faiss=(t0 + total) - first.get("index", t0 + total))
    stages["refit"] = total - stages["pass1"] - stages["faiss"]
    return total, stages


def remove(tmp: Path, n: int, m: int, index: str) -> float:
    out = tmp / "remove"
    build(out, data(n), index)
    t0 = time.perf_counter()
    gi.remove_examples(out, list(range(0, n, max(1, n // m)))[:m])
    return time.perf_counter() - t0


def best(fn, repeat: int):
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=lambda r: r[0] if isinstance(r, tuple) else r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--m", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--index", nargs="+", default=["flat", "flat:faiss"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n, m, index in [(n, m, i) for n in args.n for m in args.m for i in args.index]:
            rebuild_add = best(lambda: build(tmp / "fresh", data(n + m), index), args.repeat)
            t_add, st = best(lambda: add(tmp, n, m, index), args.repeat)
            rebuild_rm = best(lambda: build(tmp / "fresh", data(n - m), index), args.repeat)
            t_rm = best(lambda: remove(tmp, n, m, index), args.repeat)
            load = os.getloadavg()[0]
            rows.append([index, n, m, f"{t_add:.2f}", f"{rebuild_add:.2f}",
                         f"{t_add / rebuild_add:.2f}",
                         f"{st['pass1']:.2f} / {st['refit']:.2f} / {st['faiss']:.2f}",
                         f"{t_rm:.2f}", f"{rebuild_rm:.2f}", f"{t_rm / rebuild_rm:.2f}",
                         f"{load:.1f}"])
            print(f"{index} n={n} m={m} done (load {load:.1f})", file=sys.stderr,
                  flush=True)
    print(markdown_table(["index", "n", "m", "add s", "rebuild n+m s", "add/rebuild",
                          "add: pass1 / refit / index s", "remove s", "rebuild n−m s",
                          "remove/rebuild", "load avg"], rows))


if __name__ == "__main__":
    main()
