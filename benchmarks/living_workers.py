"""What splitting an add over workers costs and saves (grass_index/living/workers.py).

    python benchmarks/living_workers.py                 # n = 2000; m = 512, 2048; N = 2, 4
    python benchmarks/living_workers.py --n 4000 --m 1024 --workers 2 4 8 --repeat 3

For each n (examples indexed), m (examples added) and N (workers), side by side in one
process: `add_examples` of the m new examples in one process, then `add_shard` for each of the
N workers (run one after another here) and `merge_shards`. The workers would run at once on N
machines, so "N-way wall" is the slowest worker plus the merge: an estimate of the wall time,
not a measured one. Each time is the minimum of ``--repeat`` runs. The model and specs are
benchmarks/living.py's. Prints a markdown table of ratios and the load average beside it.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grass_index as gi  # noqa: E402
from _table import markdown_table  # noqa: E402
from living import build, data, loss, model  # noqa: E402


def base(out: Path, n: int, m: int) -> None:
    build(out, data(n + m).__class__(*[t[:n] for t in data(n + m).tensors]))


def single(tmp: Path, n: int, m: int) -> float:
    out = tmp / "single"
    base(out, n, m)
    t0 = time.perf_counter()
    gi.add_examples(out, model(), data(n + m), loss, workers=0, progress=False)
    return time.perf_counter() - t0


def split(tmp: Path, n: int, m: int, N: int) -> tuple[float, float, float]:
    """(slowest worker s, sum of the workers s, merge s)."""
    out = tmp / "split"
    base(out, n, m)
    times = []
    for i in range(N):
        t0 = time.perf_counter()
        gi.add_shard(out, model(), data(n + m), loss, f"{i}/{N}", workers=0, progress=False)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    gi.merge_shards(out, progress=False)
    return max(times), sum(times), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2000])
    ap.add_argument("--m", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in args.n:
            for m in args.m:
                t1 = min(single(tmp, n, m) for _ in range(args.repeat))
                for N in args.workers:
                    slow, total, merge = min((split(tmp, n, m, N) for _ in range(args.repeat)),
                                             key=lambda r: r[0] + r[2])
                    load = os.getloadavg()[0]
                    rows.append([n, m, N, f"{t1:.2f}", f"{slow:.2f}", f"{total:.2f}",
                                 f"{merge:.2f}", f"{(slow + merge) / t1:.2f}",
                                 f"{(total + merge) / t1:.2f}", f"{load:.1f}"])
                    print(f"n={n} m={m} N={N} done (load {load:.1f})", file=sys.stderr,
                          flush=True)
                shutil.rmtree(tmp / "split", ignore_errors=True)
    print(markdown_table(["n", "m", "N", "one process s", "slowest worker s", "all workers s",
                          "merge s", "N-way wall / one", "all work / one", "load"], rows))


if __name__ == "__main__":
    main()
