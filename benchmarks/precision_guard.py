"""What pass 2's per-chunk precision guard costs (issue 20 §1): the per-layer rule (a layer
block's own sketch against its preconditioned block, saturated blocks stored as 0) beside the
whole-row rule it replaced (largest |entry| of the row, one threshold), on one chunk of an
LM-wide store (48 layers x 4096 = 196,608 columns, 340 rows: pass 2's CHUNK_BYTES), and beside
the preconditioning GEMMs of that chunk that it follows.

    python benchmarks/precision_guard.py [--reps 7]

Best of --reps, alternating, in one process; ratios are what to read (print `uptime` beside).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import markdown_table  # noqa: E402
from grass_index.precondition import guard_precision  # noqa: E402
from grass_index.precondition.fisher import layer_slices  # noqa: E402


def whole_row_rule(raw, vec):
    """The rule before issue 20 (baseline): a row is refused when its largest |entry| is below
    1e-30 while its sketch is not zero, or when it is not finite."""
    raw_max = np.abs(raw).max(axis=1)
    finite = np.isfinite(vec).all(axis=1)
    vec_max = np.where(finite, np.abs(np.where(np.isfinite(vec), vec, 0)).max(axis=1), 0)
    return np.flatnonzero((raw_max > 0) & finite & (vec_max < 1e-30)), np.flatnonzero(~finite)


def best(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=340)
    a = ap.parse_args()
    layout = {f"h.{i}": a.k for i in range(a.layers)}
    slices = layer_slices(layout)
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((a.rows, a.layers * a.k), dtype=np.float32)
    raw[:3] *= 1e-38  # three saturated examples
    inv = (np.eye(a.k, dtype=np.float32) * 0.5)
    vec = raw.copy()

    def gemms():
        for sl in slices.values():
            np.matmul(raw[:, sl], inv, out=vec[:, sl])

    gemms()
    res = {"whole-row rule (before)": [], "per-layer rule (now)": [], "GEMMs of the chunk": []}
    for _ in range(a.reps):  # alternate, so load changes hit both alike
        res["whole-row rule (before)"].append(best(lambda: whole_row_rule(raw, vec), 1))
        res["per-layer rule (now)"].append(best(lambda: guard_precision(raw, vec, slices), 1))
        res["GEMMs of the chunk"].append(best(gemms, 1))
    base = min(res["whole-row rule (before)"])
    gem = min(res["GEMMs of the chunk"])
    rows = [(name, f"{min(t) * 1e3:.1f}", f"{min(t) / base:.2f}", f"{min(t) / gem:.3f}")
            for name, t in res.items()]
    print(f"chunk {a.rows} x {a.layers * a.k} float32, {a.layers} layers of {a.k}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(markdown_table(["", "ms (best)", "vs before", "vs GEMMs"], rows))


if __name__ == "__main__":
    main()
