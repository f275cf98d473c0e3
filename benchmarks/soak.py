"""Soak test: many random kill -9s of a real `grass-index build`, each followed by a resume.

    python benchmarks/soak.py                 # 30 kills
    python benchmarks/soak.py --kills 12 --n 2048 --seed 1

A synthetic task (an MLP on random data, written to a temp dir) is built once without
interruption (the reference). Then, in "episodes" (each a fresh output directory), a build is
started, killed with SIGKILL at a uniformly random moment of its remaining work (measured from
the moment it holds the store's writer lock, so no kill is wasted on interpreter start-up), and
re-run, until it finishes. After every kill the store must hold a prefix of whole batches that
is bit-identical to the reference and never shorter than before; at the end of an episode the
index must equal the reference: raw sketches, FAISS vectors, top-k ids and scores.

Prints a table: kills survived, records lost, records duplicated, bit-identical, total time, and
where the kills landed (pass 1 / pass 2 sub-stages).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

TASK = textwrap.dedent("""
    import os, time
    import torch, torch.nn.functional as F
    from torch import nn

    N = int(os.environ.get("SOAK_N", "2048"))
    SLEEP = float(os.environ.get("SOAK_SLEEP", "0"))

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                             nn.Linear(64, 10))

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 64, generator=g)
        return torch.utils.data.TensorDataset(x, torch.randint(0, 10, (n,), generator=g))

    def train_data():
        return _data(N, 1)

    def query_data():
        return _data(16, 2)

    def loss(model, batch):
        if SLEEP and torch.is_grad_enabled():
            time.sleep(SLEEP)  # stands in for an expensive model
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")
""")
CLI = [sys.executable, "-m", "grass_index"]


def committed(out: Path) -> int:
    from grass_index.store import SketchStore, StoreError

    try:
        with SketchStore.open(out / "sketches", readonly=True) as st:
            return st.committed_blocks
    except StoreError:
        return -1


def lock_pid(out: Path):
    try:
        return json.loads((out / "sketches" / "writer.lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def phase(out: Path, n_blocks: int) -> str:
    from grass_index.store import SketchStore

    if (out / "config.json").exists():
        return "finished (after config.json)"
    c = committed(out)
    if c < n_blocks:
        return "pass 1"
    with SketchStore.open(out / "sketches", readonly=True) as st:
        fisher = st.get_meta("fisher_done", False)
        precond = any(a.startswith("precond/") for a in st.array_names())
    if list(out.glob("index-*.faiss")):
        return "pass 2: FAISS written"
    if precond:
        return "pass 2: preconditioner stored"
    return "pass 2: Fisher cached" if fisher else "pass 2: Fisher"


def store_blocks(out: Path):
    from grass_index.store import SketchStore

    with SketchStore.open(out / "sketches", readonly=True) as st:
        problems = st.verify()
        blocks = list(st.iter_blocks())
    return problems, blocks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--n", type=int, default=2048, help="training examples")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sleep", type=float, default=0.02, help="seconds per batch in the loss")
    ap.add_argument("--projection", default="sjlt-1024")
    ap.add_argument("--sparsification", default="random_mask-32*64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="default: a temp dir (removed at the end)")
    a = ap.parse_args(argv)

    import grass_index as gi
    from grass_index.task import load_task

    rng = random.Random(a.seed)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="grass-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    task = work / "soak_task.py"
    task.write_text(TASK)
    env = dict(os.environ, SOAK_N=str(a.n), SOAK_SLEEP=str(a.sleep))
    n_blocks = math.ceil(a.n / a.batch_size)
    cmd = lambda out: CLI + ["build", str(task), "--out", str(out), "--sparsification",  # noqa
                             a.sparsification, "--projection", a.projection,
                             "--batch-size", str(a.batch_size)]
    t_start = time.perf_counter()

    # -- reference (uninterrupted), timing pass 1 and pass 2 from the moment the lock is held
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    p = subprocess.Popen(cmd(ref), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    t_lock = t_p2 = t_done = None
    while p.poll() is None and t_done is None:
        now = time.monotonic()
        if t_lock is None and lock_pid(ref) == p.pid:
            t_lock = now
        if t_p2 is None and committed(ref) == n_blocks:
            t_p2 = now
        if (ref / "config.json").exists():
            t_done = now
        time.sleep(0.005)
    _, err = p.communicate()
    if p.returncode != 0:
        print(err, file=sys.stderr)
        return 1
    t_done = t_done or time.monotonic()
    pass1_s, pass2_s = (t_p2 or t_done) - (t_lock or t_done), t_done - (t_p2 or t_done)
    _, ref_blocks = store_blocks(ref)
    ref_rows = np.concatenate([r for _, r in ref_blocks])
    print(f"reference: {a.n} examples, {n_blocks} batches, pass 1 {pass1_s:.2f} s, "
          f"pass 2 {pass2_s:.2f} s (after start-up)", file=sys.stderr)

    t = load_task(str(task))
    model, items = t.model(), [t.query_data()[i] for i in range(16)]
    ref_idx = gi.open_index(ref)
    q = ref_idx.query_sketches(model, items, t.loss, collate=t.collate)
    ref_top = ref_idx.search(q, 10)
    ref_vec = ref_idx.vindex.reconstruct(np.arange(a.n, dtype=np.int64))

    kills = lost = dup = episodes = not_identical = prefix_bad = 0
    scale = 1.0  # shrinks when builds turn out faster than the reference timing
    landed = collections.Counter()
    while kills < a.kills:
        episodes += 1
        out = work / f"episode{episodes}"
        shutil.rmtree(out, ignore_errors=True)
        high = 0  # most rows ever seen committed in this episode
        while True:
            p = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            while lock_pid(out) != p.pid and p.poll() is None:
                time.sleep(0.005)
            t_lock = time.monotonic()
            done_frac = max(committed(out), 0) / n_blocks
            remaining = scale * ((1 - done_frac) * pass1_s + pass2_s)
            killed = False
            if kills < a.kills and p.poll() is None:
                time.sleep(rng.uniform(0, remaining))
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    killed = True
            _, err = p.communicate()
            if not killed and kills < a.kills and remaining > 0:
                # finished before the kill: the reference timing was pessimistic (machine load)
                scale *= max(0.2, min(1.0, (time.monotonic() - t_lock) / remaining))
            if killed and p.returncode == -signal.SIGKILL:
                kills += 1
                landed[phase(out, n_blocks)] += 1
            elif p.returncode != 0:
                print(f"build failed (rc {p.returncode}): {err}", file=sys.stderr)
                return 1
            problems, blocks = store_blocks(out)
            rows = sum(len(r) for _, r in blocks)
            lost += max(0, high - rows)  # committed rows that disappeared
            high = max(high, rows)
            for b, (s, r) in enumerate(blocks):
                if problems or s != b * a.batch_size or not np.array_equal(
                        r, ref_rows[s:s + len(r)]):
                    prefix_bad += 1
                    break
            if (out / "config.json").exists() and not killed:
                break
            print(f"  kill {kills}: {phase(out, n_blocks)}", file=sys.stderr)
        # -- the finished episode against the reference
        seen = np.zeros(a.n, dtype=np.int64)
        for s, r in blocks:
            seen[s:s + len(r)] += 1
        lost += int((seen == 0).sum())
        dup += int((seen > 1).sum())
        idx = gi.open_index(out)
        vec = idx.vindex.reconstruct(np.arange(a.n, dtype=np.int64))
        same = (np.array_equal(np.concatenate([r for _, r in blocks]), ref_rows)
                and np.array_equal(vec, ref_vec) and idx.search(q, 10) == ref_top
                and idx.vindex.ntotal == a.n
                and gi.attribute.verify_index(out)["ok"]
                and not [f for f in out.iterdir() if ".tmp" in f.name])
        not_identical += not same
        idx.close()
        print(f"episode {episodes}: finished after {kills} kills in total, identical={same}",
              file=sys.stderr)
    total = time.perf_counter() - t_start

    rows = [("kills survived", f"{kills}"), ("episodes (fresh builds)", f"{episodes}"),
            ("records lost", f"{lost}"), ("records duplicated", f"{dup}"),
            ("bad prefixes after a kill", f"{prefix_bad}"),
            ("bit-identical to uninterrupted", "yes" if not not_identical and not prefix_bad
             else f"no ({not_identical} episodes differ)"),
            ("total time", f"{total:.1f} s")]
    rows += [(f"  kills in {k}", str(v)) for k, v in sorted(landed.items())]
    w = max(len(k) for k, _ in rows)
    print(f"{'metric':<{w}} | value")
    print(f"{'-' * w}-+-{'-' * 12}")
    for k, v in rows:
        print(f"{k:<{w}} | {v}")
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if (lost == dup == not_identical == prefix_bad == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
