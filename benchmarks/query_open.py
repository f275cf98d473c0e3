"""What opening an index's FAISS file costs a query, by how it is read: the full CRC first
(one sequential read of the file) or only the container's lengths/magic/metadata (the CRC left
to `grass-index verify`), and the vectors read into memory or memory-mapped
(``IO_FLAG_MMAP_IFC``). Each variant runs in a fresh process: load the index, then one exact
search of a random query (what a `grass-index query` does after its gradient).

    PYTHONPATH=$PWD python3 benchmarks/query_open.py WORK/idx [--reps 2]

Variants alternate rep by rep so machine load falls on all alike; the minimum is shown.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
import numpy as np
from grass_index.indexdir.config import read_record
from grass_index.indexdir.stored import load_faiss
from pathlib import Path
path, verify, mmap = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
record = read_record(path)
t0 = time.perf_counter()
vindex = load_faiss(path, record, mmap=mmap, verify=verify)
t1 = time.perf_counter()
q = np.random.default_rng(0).standard_normal((1, vindex.dim)).astype(np.float32)
scores, ids = vindex.search(q, 10)
t2 = time.perf_counter()
print("RESULT " + json.dumps(dict(load=t1 - t0, search=t2 - t1, ids=np.asarray(ids).tolist())))
"""

VARIANTS = [("CRC + read", True, False), ("no CRC + read", False, False),
            ("no CRC + mmap", False, True), ("CRC + mmap", True, True)]


def one(path: str, verify: bool, mmap: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(int(verify)), str(int(mmap))],
                         capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("index")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    runs = {name: [] for name, *_ in VARIANTS}
    for _ in range(args.reps):
        for name, verify, mmap in VARIANTS:
            runs[name].append(one(args.index, verify, mmap))
    ids = {json.dumps(r["ids"]) for rs in runs.values() for r in rs}
    size = sum(f.stat().st_size for f in __import__("pathlib").Path(args.index).glob("*.faiss"))
    print(f"index {args.index}: FAISS files {size / 1e9:.2f} GB; min of {args.reps} fresh "
          f"processes; load average {os.getloadavg()[0]:.1f}; same top-10 in every run: "
          f"{len(ids) == 1}")
    print("| read | open s | first search s | total s | vs CRC + read |\n|---|---|---|---|---|")
    base = None
    for name, *_ in VARIANTS:
        load = min(r["load"] for r in runs[name])
        search = min(r["search"] for r in runs[name])
        total = min(r["load"] + r["search"] for r in runs[name])
        base = base or total
        print(f"| {name} | {load:.2f} | {search:.2f} | {total:.2f} | {total / base:.2f}× |")


if __name__ == "__main__":
    main()
