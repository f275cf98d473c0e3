"""Default damping vs tuned vs identity, per task: does a rule computed from the index alone
(the spectrum of each layer's Fisher) land within 0.03 LDS of the best damping?

    python benchmarks/damping.py [--tasks digits,tagging,...] [--subsets 30] [--seeds 0]
    python benchmarks/damping.py --tasks tiny_gpt --subsets 16   # the LM row (47 min, 2 cores)

For each task: build an index (default specs unless the task row says otherwise), train the
LDS ground truth once (M subsets × seeds retrained models, cached under --out and resumed),
then from the stored sketches (grass_index.eval.tune's sweep: one eigendecomposition per
layer) compute the LDS over all queries of

  * the default before "auto" (0.3 × mean eigenvalue per layer; what a recorded null means),
  * damping "auto", the default (grass_index.precondition.damping.auto_damping: λ_l from F_l's
    eigenvalues), and the same with the eigenvalues computed as a build computes them
    (precondition/eigen.py's two-stage LAPACK reduction) from F_l = Q diag(e) Qᵀ in a random
    basis Q (eFIM layers; EK-FAC's eigenvalues are exact by construction): the "as fitted"
    column must equal the rule's,
  * every factor of tune's grid extended to the identity limit (1e-3 … 1e6 × mean eigenvalue);
    "tune best" is the best of them and identity — what tune could at most find,
  * identity (raw gradient inner products).

and, over the tasks run, a leave-one-task-out check of auto's one constant (AUTO_MULTIPLE).
Runs one task after another in one process (2-core machine); `--threads 1` trains fastest.
Each task's sweep arrays are kept in --out (<task>-m<M>-s<seeds>.npz), so a rerun only
evaluates. Run it with GRASS_INDEX_CACHE set to a private directory when other processes may
retrain the cached example models meanwhile (the index must see the weights it was built with).
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
from grass_index.eval.tune import _lds_of, prepare  # noqa: E402
from grass_index.precondition import damping as dmp  # noqa: E402

EX = ROOT / "examples"
FACTOR_TAG = "per-layer"
# name: (task file, build options, hessian of the rows)
TASKS = {
    "digits": (EX / "digits.py", {}, "eFIM"),
    "digits, 10% labels flipped": (EX / "digits_noisy.py", {}, "eFIM"),
    "token tagging": (EX / "token_tagging.py", {}, "eFIM"),
    "token tagging, EK-FAC": (EX / "token_tagging.py",
                              dict(sparsification="identity-64*64", projection="identity"),
                              "ekfac"),
    "saturated tabular MLP": (EX / "saturated.py", {}, "eFIM"),
    "tiny GPT (LM)": (EX / "tiny_gpt.py", dict(sparsification="random_mask-32*32",
                                               projection="sjlt-1024"), "eFIM"),
}
KEYS = {"digits": "digits", "digits, 10% labels flipped": "noisy", "token tagging": "tagging",
        "token tagging, EK-FAC": "tagging-ekfac", "saturated tabular MLP": "saturated",
        "tiny GPT (LM)": "tiny_gpt"}
GRID = tuple(float(f"{x:.0e}") for x in np.logspace(-3, 6, 19))  # 1e-3, 3e-3, …, 1e6


def spectra(prep, hessian: str) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Per layer (name, eigenvalues, query coordinates, subset-sum coordinates) in F_l's
    eigenbasis (EK-FAC: its Kronecker eigenbasis and corrected eigenvalues)."""
    out = []
    for name, e, qU, GU, _ in prep.sweep.layers:
        if hessian == "ekfac" and name in prep.sweep.ekfac:
            e, qU, GU = prep.sweep.ekfac[name]
        out.append((name, np.clip(np.asarray(e, dtype=np.float64), 0, None), qU, GU))
    return out


def lds_at(layers, losses, lams) -> float:
    """LDS over all queries with damping λ_l per layer (None: identity)."""
    pred = 0.0
    for (name, e, qU, GU), lam in zip(layers, lams):
        pred = pred + (GU @ qU.T if lam is None else GU @ (qU / (e + lam)).T)
    return _lds_of(pred, losses, np.arange(losses.shape[1]))


def prepared(name: str, out: Path, m: int, seeds: list[int]):
    path, opts, hessian = TASKS[name]
    d = out / KEYS[name]
    task = gi.load_task(path)
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        gi.build_index(task.model(), task.train_data(), task.loss, out=d, task=task.ref,
                       progress=False, batch_size=64, collate=task.collate,
                       **opts)
    gt = out / f"gt-{path.stem}-m{m}-s{'_'.join(map(str, seeds))}"
    return prepare(gi.open_index(d), task=task, num_subsets=m, seeds=seeds, ground_truth=gt,
                   progress=False), hessian




def as_fitted(e: np.ndarray) -> np.ndarray:
    """The eigenvalues of F = Q diag(e) Qᵀ (Q a seeded random orthogonal basis) as a build
    computes them (grass_index.precondition.eigen.eigenvalues)."""
    from grass_index.precondition.eigen import eigenvalues

    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((len(e), len(e))))[0]
    return eigenvalues((q * e) @ q.T)


def evaluate(layers, losses, hessian: str = "eFIM") -> dict:
    """LDS of the old default, the auto rule (and as a build fits it), every grid factor and
    identity; the best."""
    mean = [e.mean() for _, e, _, _ in layers]
    row = {"identity": lds_at(layers, losses, [None] * len(layers)),
           "default": lds_at(layers, losses, [dmp.LEGACY_DAMPING * m for m in mean])}
    lams = [dmp.auto_damping(e) for _, e, _, _ in layers]
    row["auto"] = lds_at(layers, losses, lams)
    fitted = [dmp.auto_damping(as_fitted(e)) if hessian == "eFIM" else lam
              for (_, e, _, _), lam in zip(layers, lams)]
    row["auto as fitted"] = lds_at(layers, losses, fitted)
    row["λ gap"] = max(abs(a - b) / b for a, b in zip(fitted, lams) if b > 0)
    row["auto factors"] = [lam / m for lam, m in zip(lams, mean)]
    row["grid"] = {f: lds_at(layers, losses, [f * m for m in mean]) for f in GRID}
    best_f = max(row["grid"], key=row["grid"].get)
    row["best"] = max(row["grid"][best_f], row["identity"])
    row["best at"] = f"{best_f:g}×" if row["grid"][best_f] >= row["identity"] else "identity"
    row["placement"] = [dmp.placement(e, lam) for (_, e, _, _), lam in zip(layers, lams)]
    return row


def leave_one_task_out(tasks: dict, multiples=tuple(np.logspace(0, 3, 31))) -> list[list]:
    """For each task: the auto multiple that maximises the worst gap to the best over the
    *other* tasks, and the gap it leaves on the held-out one (is the rule fitted, or general?)"""
    gaps = {}
    for name, (layers, losses, best) in tasks.items():
        gaps[name] = np.array([lds_at(layers, losses, [dmp.auto_damping(e, c)
                                                       for _, e, _, _ in layers]) - best
                               for c in multiples])
    rows = []
    for held in tasks:
        others = np.min([g for n, g in gaps.items() if n != held], axis=0)
        i = int(np.argmax(others))
        rows.append([held, f"{multiples[i]:.3g}", f"{others[i]:+.3f}", f"{gaps[held][i]:+.3f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-damping"))
    ap.add_argument("--tasks", default="digits,noisy,tagging,tagging-ekfac,saturated",
                    help=f"comma list of {', '.join(KEYS.values())}")
    ap.add_argument("--subsets", type=int, default=30)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweeps", action="store_true", help="also print each task's grid")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.tasks.split(",")
    rows, results, loto = [], {}, {}
    for name, key in KEYS.items():
        if key not in wanted:
            continue
        t0 = time.perf_counter()
        dump = Path(args.out) / f"{key}-m{args.subsets}-s{'_'.join(map(str, seeds))}.npz"
        if not dump.is_file():  # the sweep's arrays: a rerun evaluates without rebuilding
            prep, hessian = prepared(name, Path(args.out), args.subsets, seeds)
            _dump(dump, spectra(prep, hessian), prep.losses)
        layers, losses = _load(dump)
        r = results[name] = evaluate(layers, losses, TASKS[name][2])
        loto[name] = (layers, losses, r["best"])
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        rows.append([name, TASKS[name][2], f"{r['default']:.3f}",
                     f"{r['auto']:.3f} ({_factors(r['auto factors'])})",
                     f"{r['auto as fitted']:.3f} ({r['λ gap']:.0e})",
                     f"{r['best']:.3f} ({r['best at']})", f"{r['identity']:.3f}",
                     "yes" if r["auto"] >= r["best"] - 0.03 else "no",
                     "yes" if r["default"] >= r["best"] - 0.03 else "no"])
    print(f"\nLDS over all queries ({args.subsets} subsets × seeds {seeds} retrained models; "
          "auto's λ_l / mean eigenvalue of F_l in brackets, per layer)\n")
    print(markdown_table(["task", "hessian", "before: 0.3 × mean eig (null record)",
                          "default: auto (spectrum rule)", "auto as fitted (max λ gap)",
                          "best (grid 1e-3…1e6 ×, identity)", "identity",
                          "auto within 0.03", "0.3 within 0.03"], rows))
    if len(loto) > 2:
        print("\nleave one task out: auto's multiple chosen on the other tasks (max of their "
              "worst gap to the best), and the held-out task's gap (the library uses "
              f"{dmp.AUTO_MULTIPLE:g})\n")
        print(markdown_table(["held-out task", "multiple", "worst gap, other tasks",
                              "gap, held-out task"], leave_one_task_out(loto)))
    for name, r in results.items():
        print(f"\n{name}: auto's placement per layer — {r['placement']}")
        if args.sweeps:
            print(" ".join(f"{f:g}:{v:.3f}" for f, v in r["grid"].items()))


def _dump(path: Path, layers, losses) -> None:
    arrays = {"losses": losses}
    for i, (name, e, qU, GU) in enumerate(layers):
        arrays.update({f"e{i}": e, f"q{i}": qU, f"G{i}": GU, f"name{i}": np.array(name)})
    np.savez(path, **arrays)


def _load(path: Path):
    z = np.load(path)
    n = sum(1 for k in z.files if k.startswith("e"))
    return [(str(z[f"name{i}"]) if f"name{i}" in z.files else str(i), z[f"e{i}"], z[f"q{i}"],
             z[f"G{i}"]) for i in range(n)], z["losses"]


def _factors(fs) -> str:
    return "/".join(f"{f:.2g}" for f in fs) + "×"


if __name__ == "__main__":
    main()
