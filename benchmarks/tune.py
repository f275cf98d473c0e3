"""`tune` on two tasks: the chosen preconditioner's held-out LDS beside identity, the library
default and the best fixed damping (chosen with hindsight on the held-out queries).

    python benchmarks/tune.py [--subsets 50] [--seeds 0,1,2] [--split-seeds 0,1,2]

Tasks: examples/digits.py and examples/digits_noisy.py (10% flipped labels), default build
specs. Ground truth (M subsets × seeds of retrained MLPs) is cached under --out and shared by
all rows. For each split seed the queries are halved into validation (chooses) and held-out
(reports); tune's sweep is computed from the stored sketches (grass_index.eval.tune), and the
index is re-preconditioned once with the winner at the end.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grass_index as gi  # noqa: E402
from benchmarks._table import markdown_table  # noqa: E402
from grass_index.eval.tune import prepare, tune_index  # noqa: E402

TASKS = {"digits": ROOT / "examples" / "digits.py",
         "digits, 10% labels flipped": ROOT / "examples" / "digits_noisy.py"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-tune"))
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split-seeds", default="0,1,2")
    ap.add_argument("--tasks", default=",".join(p.stem for p in TASKS.values()),
                    help="comma list of example stems (run them in separate processes to use "
                         "more cores; each retrains its own ground truth)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny MLPs train "
                    "fastest on one)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    wanted = set(args.tasks.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    split_seeds = [int(s) for s in args.split_seeds.split(",")]
    out = Path(args.out)
    summary, sweeps = [], {}
    for name, path in TASKS.items():
        if path.stem not in wanted:
            continue
        task = gi.load_task(path)
        d = out / path.stem
        if not (d / "config.json").is_file():
            shutil.rmtree(d, ignore_errors=True)
            gi.build_index(task.model(), task.train_data(), task.loss, out=d, task=task.ref,
                           progress=False, batch_size=128)
        gt = out / f"gt-{path.stem}-m{args.subsets}"
        per_split = []
        t0 = time.perf_counter()
        prep = prepare(gi.open_index(d), num_subsets=args.subsets, seeds=seeds, ground_truth=gt,
                       progress=False)
        print(f"{name}: ground truth + sweep sums in {time.perf_counter() - t0:.1f} s",
              flush=True)
        for s in split_seeds:
            t0 = time.perf_counter()
            res = tune_index(d, split_seed=s, apply=False, prepared=prep,
                             extend=False)  # the same grid on every split (by position)
            per_split.append(res)
            print(f"{name}, split {s}: chose {res.choice.name} "
                  f"(val {res.choice.val_lds:.4f}, held-out {res.choice.heldout_lds:.4f}) "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
        sweeps[name] = per_split

        def held(pick):
            return np.mean([pick(r).heldout_lds for r in per_split])

        ident = held(lambda r: r.grid[0])
        default = held(lambda r: next(c for c in r.grid if c.scope == "per-layer"
                                      and c.factor == 0.3))
        # hindsight: the fixed grid point with the best mean held-out LDS over the splits
        n_grid = len(per_split[0].grid)
        fixed = [np.mean([r.grid[j].heldout_lds for r in per_split]) for j in range(n_grid)]
        jbest = int(np.nanargmax(fixed[1:])) + 1
        best_pl = max((fixed[j], per_split[0].grid[j].name) for j in range(n_grid)
                      if per_split[0].grid[j].scope == "per-layer")
        best_gl = max((fixed[j], per_split[0].grid[j].name) for j in range(n_grid)
                      if per_split[0].grid[j].scope == "global")
        tuned = held(lambda r: r.choice)
        goal = max(ident, fixed[jbest]) - 0.01
        summary.append([name, f"{ident:.3f}", f"{default:.3f}",
                        f"{fixed[jbest]:.3f} ({per_split[0].grid[jbest].name})",
                        f"{best_pl[0]:.3f}", f"{best_gl[0]:.3f}", f"**{tuned:.3f}**",
                        "yes" if tuned >= goal else f"no ({tuned - goal + 0.01:+.3f})",
                        ", ".join(sorted({r.choice.name for r in per_split}))])
        # finally make the split-0 choice the index's default, as `grass-index tune` does
        tune_index(d, split_seed=0, prepared=prep, progress=False)

    print(f"\nheld-out LDS (mean over split seeds {split_seeds}; {args.subsets} subsets × "
          f"seeds {seeds}; half the queries choose, the other half report)\n")
    print(markdown_table(["task", "identity", "default eFIM 0.3", "best fixed (hindsight)",
                          "best per-layer", "best global", "tuned", "≥ max(identity, best fixed)"
                          " − 0.01", "chosen"], summary))
    for name, per_split in sweeps.items():
        print(f"\n{name}: sweep, split seed {split_seeds[0]} (validation / held-out LDS)\n")
        r = per_split[0]
        print(markdown_table(["candidate", "validation", "held-out"],
                             [[c.name, f"{c.val_lds:.4f}", f"{c.heldout_lds:.4f}"]
                              for c in r.grid]))


if __name__ == "__main__":
    main()
