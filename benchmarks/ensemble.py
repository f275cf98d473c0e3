"""Checkpoint ensembles (TRAK-style): LDS of one index over 1, 2, 5 independently trained
seeds of the digits MLP, and what the ensemble costs to build.

    python benchmarks/ensemble.py [--subsets 30] [--seeds 0] [--checkpoints 5]

Checkpoint s is examples/digits.py's recipe with init seed s. For C = 1, 2, 5 every window of
C consecutive checkpoints gets ONE ensemble index (``build_index([m_s, ..., m_{s+C-1}], ...)``:
per-checkpoint sketches and preconditioner blocks, scores = mean over checkpoints), timed (the
fastest of --repeats builds from scratch: the machine is shared) and scored by LDS. Beside it,
the mean of the separately built single-model indexes' score matrices (what the ensemble
computes, so the two columns must agree to float rounding), and the build time of the ensemble
over the single-model build. Ground truth is the same as
benchmarks/tune.py's (cached under --out). Specs default to FactGraSS-1024 (random_mask-64*64
-> sjlt-1024), within 0.003 LDS of the default specs on digits (see README), faster to build.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grass_index as gi  # noqa: E402
from benchmarks._table import markdown_table  # noqa: E402
from grass_index.eval import lds, make_subsets, train_ground_truth  # noqa: E402

TASK = ROOT / "examples" / "digits.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-tune"))
    ap.add_argument("--subsets", type=int, default=30)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--sparsification", default="random_mask-64*64")
    ap.add_argument("--projection", default="sjlt-1024")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="builds timed per index (min)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = gi.load_task(TASK)
    D = task.source
    train, query = task.train_data(), task.query_data()
    out = Path(args.out)
    masks = make_subsets(len(train), args.subsets, 0.5, 0)
    gt = train_ground_truth(task.train, train, query, task.loss, masks,
                            [int(s) for s in args.seeds.split(",")],
                            out / f"gt-digits-m{args.subsets}", progress=False,
                            collate=task.collate, tag=task.ref)
    x, y = D.split("train")
    models = [D.train_model(x, y, seed=s) for s in range(args.checkpoints)]

    def build(ms, name):
        d = out / name
        times = []
        for _ in range(args.repeats):  # from scratch each time; the fastest (a shared machine)
            shutil.rmtree(d, ignore_errors=True)
            t0 = time.perf_counter()
            idx = gi.build_index(ms if len(ms) > 1 else ms[0], train, task.loss, out=d,
                                 sparsification=args.sparsification,
                                 projection=args.projection, progress=False, batch_size=128)
            times.append(time.perf_counter() - t0)
        secs = min(times)
        scores = idx.score(ms if len(ms) > 1 else ms[0], query, task.loss).double().numpy()
        return scores, secs

    singles = [build([m], f"ensemble-single{s}") for s, m in enumerate(models)]
    single_secs = float(np.mean([secs for _, secs in singles]))
    rows = []
    for c in (1, 2, 5):
        if c > len(models):
            break
        ens, sep, secs = [], [], []
        for i in range(len(models) - c + 1):  # every window of c consecutive checkpoints
            if c == 1:
                s, t = singles[i]
            else:
                s, t = build(models[i:i + c], f"ensemble-c{c}-w{i}")
            ens.append(lds(s, gt.subsets, gt.losses)[0])
            secs.append(t)
            mean = np.mean([singles[j][0] for j in range(i, i + c)], axis=0)
            sep.append(lds(mean, gt.subsets, gt.losses)[0])
        rows.append([c, f"{np.mean(ens):.4f}", f"{min(ens):.4f}–{max(ens):.4f}",
                     f"{np.mean(sep):.4f}", len(ens), f"{np.mean(secs):.1f}",
                     f"{np.mean(secs) / single_secs:.2f}×"])
        print(f"{c} checkpoint(s): LDS {np.mean(ens):.4f}", flush=True)
    print(f"\nLDS on {len(query)} digits queries, {args.subsets} subsets × seeds {args.seeds}; "
          f"{args.sparsification} -> {args.projection}, eFIM 0.3, {len(train)} training "
          f"examples, {torch.get_num_threads()} thread(s)\n")
    print(markdown_table(["checkpoints", "LDS, one ensemble index (mean over windows)",
                          "range", "LDS, mean of single indexes' scores", "windows",
                          "build s", "build time vs 1"], rows))


if __name__ == "__main__":
    main()
