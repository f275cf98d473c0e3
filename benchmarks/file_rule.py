"""What the file rule and the one atomic write cost, against the code they replaced, in one
process, the same files:

    python benchmarks/file_rule.py            # 300 rounds each
    python benchmarks/file_rule.py --rounds 50

Rows: reading config.json (Path.read_bytes vs fileio.read_json's lstat + O_NOFOLLOW|O_NONBLOCK
open + fstat), writing it atomically (the old fileio.atomic_save: temp, fsync, rename — vs
fileio.atomic_write: O_EXCL|O_NOFOLLOW temp, fsync, rename, directory fsync), and the checks
before LMDB opens a store (store/_env.check_lmdb_files) beside a read-only open of the store.
Times are the minimum per operation over interleaved rounds; ratio = now / before.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _table import markdown_table  # benchmarks/ is on sys.path when run as a script

from grass_index.fileio import atomic_write, read_json
from grass_index.store import SketchStore
from grass_index.store._env import check_lmdb_files

CONFIG = {f"key{i}": [i] * 20 for i in range(200)}  # ~10 KB, like a real config.json


def old_atomic_save(path: Path, data: bytes) -> None:
    """fileio.atomic_save before this change (no O_EXCL/O_NOFOLLOW, no directory fsync)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(old, new, rounds: int) -> tuple[float, float]:
    """Minimum time of each, the two interleaved (a shared, loaded machine: the minimum is
    the least disturbed run, and interleaving gives both the same conditions)."""
    t_old, t_new = [], []
    for _ in range(rounds):
        t_old.append(timed(old))
        t_new.append(timed(new))
    return min(t_old), min(t_new)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    rounds = ap.parse_args().rounds
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cfg = d / "config.json"
        data = (json.dumps(CONFIG, indent=2, sort_keys=True) + "\n").encode()
        cfg.write_bytes(data)
        with SketchStore.create(d / "sketches", dim=4, meta={}):
            pass
        pairs = [
            ("read config.json", lambda: json.loads(cfg.read_bytes()), lambda: read_json(cfg)),
            ("write config.json atomically", lambda: old_atomic_save(cfg, data),
             lambda: atomic_write(cfg, data)),
            ("open a store read-only (+ its file checks)",
             lambda: SketchStore.open(d / "sketches").close(),
             lambda: (check_lmdb_files(str(d / "sketches"), readonly=True),
                      SketchStore.open(d / "sketches").close())),
        ]
        rows = []
        for what, old, new in pairs:
            t_old, t_new = side_by_side(old, new, rounds)
            rows.append([what, f"{t_old * 1e6:.0f} µs", f"{t_new * 1e6:.0f} µs",
                         f"{t_new / t_old:.2f}×"])
    print(f"load average {os.getloadavg()[0]:.1f}, {rounds} rounds each, interleaved (minimum)")
    print(markdown_table(["operation", "before", "now", "ratio"], rows))


if __name__ == "__main__":
    main()
