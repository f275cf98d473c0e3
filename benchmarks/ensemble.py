"""Checkpoint ensembles, measured before the feature exists: LDS of scores averaged over
1, 2, 5 independently trained seeds of the digits MLP (TRAK-style).

    python benchmarks/ensemble.py [--subsets 30] [--seeds 0]

Each checkpoint (examples/digits.py's recipe, init seed s) gets its own index (own sketches,
own preconditioner); the ensemble score is the mean of the per-checkpoint score matrices
(AttributionIndex.score). Ground truth is the same as benchmarks/tune.py's (cached under --out).
Sparsification/projection default to FactGraSS-1024 (random_mask-64*64 -> sjlt-1024), which is
within 0.003 LDS of the default specs on digits (see README) and faster to build.
"""
from __future__ import annotations

import argparse
import shutil
import sys
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
    scores = []
    for s in range(args.checkpoints):
        model = D.train_model(x, y, seed=s)
        d = out / f"ensemble-ckpt{s}"
        shutil.rmtree(d, ignore_errors=True)
        idx = gi.build_index(model, train, task.loss, out=d, sparsification=args.sparsification,
                             projection=args.projection, progress=False, batch_size=128)
        scores.append(idx.score(model, query, task.loss).double().numpy())
        print(f"checkpoint {s}: single-model LDS {lds(scores[-1], gt.subsets, gt.losses)[0]:.4f}",
              flush=True)
    rows = []
    for c in (1, 2, 5):
        if c > len(scores):
            break
        # every window of c consecutive checkpoints (so c=1 is the mean single-model LDS)
        vals = [lds(np.mean(scores[i:i + c], axis=0), gt.subsets, gt.losses)[0]
                for i in range(len(scores) - c + 1)]
        rows.append([c, f"{np.mean(vals):.4f}", f"{min(vals):.4f}–{max(vals):.4f}", len(vals)])
    print(f"\nLDS on {len(query)} digits queries, {args.subsets} subsets × seeds {args.seeds}; "
          f"{args.sparsification} -> {args.projection}, eFIM 0.3\n")
    print(markdown_table(["checkpoints averaged", "LDS (mean over windows)", "range",
                          "windows"], rows))


if __name__ == "__main__":
    main()
