"""Throughput of the compression ops on this machine, printed as a table.

    python benchmarks/ops.py [--repeats N] [--threads T]

Compares the native sjlt kernel (torch.ops.grass_index.sjlt, whatever backend kernel is
registered) with the pure-torch fallback (grass_index.ops.reference.sjlt_reference, the
index_add_ loop) and with a dense Gaussian projection (x @ G). Throughput is *input*
GB/s (bytes of x per second), shown beside this machine's memory-copy bandwidth (bytes of
a large tensor cloned per second), which is the practical ceiling for a one-pass kernel.
A dense G of shape [d, k] does not fit in memory for d=2^20 (16 GiB), so the matmul is
timed on a d-slice of 2^16 columns and scaled linearly in d (marked "scaled").
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import grass_index as gi
from grass_index.ops.reference import mask_reference, sjlt_reference


CLOCK = time.perf_counter


def timeit(fn, repeats: int) -> float:
    """Median time of fn() in seconds (wall, or process CPU time with --clock cpu), after
    one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes of a 512 MiB tensor copied per second into a preallocated tensor (input side of
    a memory copy). A fresh clone() would mostly time page faults on the new allocation."""
    big = torch.empty(128 * 2**20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(big)
    t = timeit(lambda: dst.copy_(big), repeats)
    return big.numel() * 4 / t


def make_case(batch: int, d: int, k: int, zero_frac: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=g)
    if zero_frac > 0:
        x = x * (torch.rand(batch, d, generator=g) >= zero_frac)
    idx = torch.randint(0, k, (d,), generator=g)
    sign = (torch.randint(0, 2, (d,), generator=g, dtype=torch.int8) * 2 - 1)
    return x, idx, sign


def dense_time(x: torch.Tensor, k: int, repeats: int, max_cols: int = 2**16) -> tuple[float, bool]:
    """Time of x @ G (G Gaussian [d, k]); scaled from a column slice when G would be too big."""
    d = x.shape[1]
    cols = min(d, max_cols)
    G = torch.randn(cols, k)
    xs = x[:, :cols].contiguous()
    t = timeit(lambda: xs @ G, repeats)
    return t * d / cols, cols < d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time with 1 thread, for a busy shared machine where wall time "
                         "mostly measures other processes")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    status = gi.native_status()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, "
          f"sjlt CPU kernel: {status['kernels']['sjlt']['CPU']}")
    bw = copy_bandwidth(args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"memory copy (copy_ 512 MiB): {bw / 1e9:.1f} GB/s input; load average {load:.1f} "
          f"on {os.cpu_count()} CPUs (other processes skew every number)\n")

    cases = [("(a) B=32 d=2^20 90% zeros k=4096", 32, 2**20, 4096, 0.9),
             ("(b) B=32 d=2^18 dense      k=4096", 32, 2**18, 4096, 0.0)]
    head = f"{'case':36} {'method':24} {'ms':>9} {'GB/s':>7} {'% copy':>7} {'vs fallback':>12}"
    print(head)
    print("-" * len(head))
    for name, batch, d, k, zf in cases:
        x, idx, sign = make_case(batch, d, k, zf)
        nbytes = x.numel() * x.element_size()
        t_nat = timeit(lambda: gi.ops.sjlt(x, idx, sign, k), args.repeats)
        t_ref = timeit(lambda: sjlt_reference(x, idx, sign, k), max(1, args.repeats // 2))
        t_den, scaled = dense_time(x, k, max(1, args.repeats // 2))
        assert torch.allclose(gi.ops.sjlt(x, idx, sign, k), sjlt_reference(x, idx, sign, k), atol=1e-3)
        for method, t in (("native sjlt", t_nat), ("fallback index_add", t_ref),
                          ("dense Gaussian" + (" (scaled)" if scaled else ""), t_den)):
            gbs = nbytes / t / 1e9
            print(f"{name:36} {method:24} {t * 1e3:9.2f} {gbs:7.2f} {100 * gbs * 1e9 / bw:6.1f}% "
                  f"{t_ref / t:11.1f}x")
        name = ""
    print()

    # mask: gather k' = 2^14 of d = 2^18 coordinates for 32 rows (GB/s of output written)
    x, _, _ = make_case(32, 2**18, 4096, 0.0)
    m_idx = torch.randperm(2**18, generator=torch.Generator().manual_seed(1))[: 2**14].sort().values
    out_bytes = 32 * 2**14 * 4
    t_m = timeit(lambda: gi.ops.mask(x, m_idx), args.repeats * 4)
    t_mr = timeit(lambda: mask_reference(x, m_idx), args.repeats * 4)
    print(f"mask B=32 d=2^18 k'=2^14: native {t_m * 1e6:.0f} us ({out_bytes / t_m / 1e9:.2f} GB/s out), "
          f"fallback index_select {t_mr * 1e6:.0f} us ({out_bytes / t_mr / 1e9:.2f} GB/s out), "
          f"{t_mr / t_m:.1f}x")


if __name__ == "__main__":
    main()
