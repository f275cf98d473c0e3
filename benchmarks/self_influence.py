"""Finding flipped labels by self-influence, beside training loss and random.

    python benchmarks/self_influence.py [--out runs/bench-self-influence]

Task: examples/digits_noisy.py (digits, 10% of training labels flipped, seeded; the MLP is
trained on the noisy labels). For each ranking of the training set, the fraction of the
flipped examples that land in the top 10% / 20% of the ranking (10% is the noise rate, so
1.0 at 10% is a perfect detector; random is 0.10 / 0.20). Self-influence rows are
AttributionIndex.self_influence() on indexes built once and re-preconditioned from the
stored sketches; "exact" uses identity compression (the full 4810-dim gradient).
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

TASK = ROOT / "examples" / "digits_noisy.py"


def recall_at(scores: np.ndarray, flipped: np.ndarray, frac: float) -> float:
    """Fraction of ``flipped`` among the top ``frac`` of train ids by ``scores`` (desc)."""
    k = int(round(frac * len(scores)))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(np.isin(flipped, top).mean())


def auc(scores: np.ndarray, flipped: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.zeros(len(scores), dtype=bool)
    y[flipped] = True
    return float(roc_auc_score(y, scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-self-influence"))
    ap.add_argument("--random-draws", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    task = gi.load_task(TASK)
    flipped = task.source.flipped()
    model, train = task.model(), task.train_data()
    n = len(train)
    rows = []

    def add(name, scores, secs=None):
        rows.append([name, f"{recall_at(scores, flipped, 0.1):.3f}",
                     f"{recall_at(scores, flipped, 0.2):.3f}", f"{auc(scores, flipped):.3f}",
                     "" if secs is None else f"{secs:.2f}"])

    # Baseline: per-example training loss under the model trained on the noisy labels.
    t0 = time.perf_counter()
    with torch.no_grad():
        x, y = train.tensors
        losses = task.loss(model, (x, y)).double().numpy()
    add("highest training loss", losses, time.perf_counter() - t0)

    out = Path(args.out)
    builds = [("default specs", "random_mask-128*128", "sjlt-4096"),
              ("exact (identity)", "identity", "identity")]
    for label, spars, proj in builds:
        d = out / label.split()[0]
        shutil.rmtree(d, ignore_errors=True)
        idx = gi.build_index(model, train, task.loss, out=d, sparsification=spars,
                             projection=proj, task=task.ref, progress=False, batch_size=128)
        for hessian, damping in [("identity", None), ("eFIM", 1e-3), ("eFIM", 1e-2),
                                 ("eFIM", 0.1), ("eFIM", 0.3), ("eFIM", 1.0), ("eFIM", 10.0)]:
            idx.reprecondition(damping=damping, hessian=hessian)
            t0 = time.perf_counter()
            s = idx.self_influence().numpy()
            secs = time.perf_counter() - t0
            what = "identity (‖ĝ‖²)" if hessian == "identity" else f"eFIM, damping {damping:g}"
            add(f"self-influence, {label}, {what}", s, secs)
        K = idx.dim

    rng = np.random.default_rng(0)
    draws = [[recall_at(rng.random(n), flipped, f) for f in (0.1, 0.2)]
             for _ in range(args.random_draws)]
    mean = np.mean(draws, axis=0)
    rows.append([f"random (mean of {args.random_draws} draws)", f"{mean[0]:.3f}",
                 f"{mean[1]:.3f}", "0.500", ""])
    print(f"digits, n_train={n}, {len(flipped)} labels flipped ({len(flipped) / n:.0%}); "
          f"exact K={K}")
    print(markdown_table(["ranking", "flipped in top 10%", "flipped in top 20%", "ROC AUC",
                          "seconds"], rows))


if __name__ == "__main__":
    main()
