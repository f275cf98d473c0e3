"""GPT-2 small (random init, nothing downloaded) at the default specs: does the build fit, and
how long does it take beside a training epoch over the same data?

    PYTHONPATH=$PWD python3 benchmarks/lm.py [--n 64] [--tokens 64] [--dense] [--no-epoch]
        [--sparsification normal-64*64 --projection identity --hessian ekfac] [--keep DIR]

One build per run, in a child process so its peak RSS (VmHWM) is its own. The child first
runs one training epoch (forward + backward with weight gradients, the build's batches) and
then the build, so each phase — start (imports + model load), check (the first-batch capture
check up to pass 1), pass 1, pass 2 — is printed as a ratio to that epoch measured in the same
process. Prints the plan's prediction (time, RAM, disk) beside the measured numbers, and
(with ``--dense``) forces the
dense-Fisher path (pass-1 accumulation + in-place Cholesky per layer) that builds with n ≥ k/2
take, where the default n=64 < k keeps each layer in the exact low-rank (Woodbury) form.
``--dense`` also compares float32 inverses with float64 ones on the scores of the stored
sketches. ``--hessian ekfac`` with a factored spec (LoGra: ``normal-64*64``, identity) is
issue 21's EK-FAC row; ``--keep DIR`` keeps the index for benchmarks/query_cost.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _gpt2_task import AnonPeak, gpt2_task, peak_rss_bytes  # noqa: E402


def child(args) -> dict:
    t_start = time.time()
    import torch

    import grass_index as gi
    from grass_index import plan as plan_mod
    from grass_index.precondition import preconditioner as pre_mod

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    if args.dense:  # the pipeline and the plan both take the dense form
        from grass_index.plan import costs

        pre_mod.uses_low_rank = costs.uses_low_rank = lambda n, k: False
    work = Path(args.work)
    task = gpt2_task(work, args.n, args.tokens, args.n_layer)

    model, data = task.model(), task.train_data()
    start_s = time.time() - t_start
    epoch_s = None if args.no_epoch else _epoch(model, data, task, args.batch_size)
    rss_epoch = peak_rss_bytes()
    specs = {k: v for k, v in (("sparsification", args.sparsification),
                                ("projection", args.projection)) if v}
    # the plan, as `grass-index plan` makes it, before the build: its rates measured now
    # the damping the build will use: --damping, else the build's default ("auto"; None
    # would price an old record's 0.3 x mean eigenvalue, without auto's eigvalsh per layer)
    damping = args.damping if args.damping is not None else gi.IndexOptions().damping
    inputs = dict(n=len(data), batch_size=args.batch_size, tokens=args.tokens,
                  hessian=args.hessian, damping=damping, specs=specs,
                  n_layer=args.n_layer)
    p = plan_mod.plan_for(model, len(data), batch_size=args.batch_size, tokens=args.tokens,
                          hessian=args.hessian, damping=damping, **specs)
    rates = plan_mod.measure_rates(out=work, lapack_size=plan_mod.lapack_order([p]))
    marks, t0, rss = {}, time.time(), {}
    anon = AnonPeak()

    def progress(stage, done, total):
        if stage not in marks:
            rss[stage] = peak_rss_bytes()  # the high-water mark as each stage starts
        marks.setdefault(stage, time.time() - t0)
        marks[stage + "_end"] = time.time() - t0

    out = work / ("idx-dense" if args.dense else "idx")
    extra = {} if args.damping is None else dict(damping=args.damping)
    idx = gi.build_index(model, data, task.loss, out, collate=task.collate, progress=progress,
                         batch_size=args.batch_size, hessian=args.hessian, **specs, **extra)
    total = time.time() - t0
    anon_peak = anon.stop()
    cfg = idx.config
    pass2_start = marks["sketch_end"]
    after = plan_mod.measure_rates(out=work, lapack_size=plan_mod.lapack_order([p]))
    after_pass1 = [v for k, v in rss.items() if k != "sketch"]
    res = dict(start_s=start_s, epoch_s=epoch_s, check_s=marks["sketch"],
               rss_epoch_gb=rss_epoch / 1e9, n=len(data), tokens=args.tokens,
               K=cfg["dim"], layers=len(cfg["layout"]), dense=args.dense,
               hessian=cfg["hessian"], specs=specs, sketch_bytes=4 * len(data) * cfg["dim"],
               peak_rss_gb=peak_rss_bytes() / 1e9, peak_anon_gb=anon_peak / 1e9,
               rss_pass1_gb=(min(after_pass1) if after_pass1 else peak_rss_bytes()) / 1e9,
               pass1_s=pass2_start - marks["sketch"],
               pass2_s=total - pass2_start, load=os.getloadavg(),
               total_s=total, recall=cfg["index"].get("recall"), marks=marks,
               index_dim=cfg["index"]["dim"], forms=cfg["preconditioner"].get("forms"),
               disk=_disk_parts(out), inputs=inputs, planned_width=p.index_width,
               rates=dataclasses.asdict(rates), rates_after=dataclasses.asdict(after),
               model_bytes=sum(x.numel() * x.element_size() for x in model.parameters()))
    res["disk_gb"] = sum(res["disk"].values()) / 1e9
    res.update(predict(res, model))
    if args.dense:
        res.update(_float32_vs_float64(out, cfg))
    return res


def _disk_parts(out: Path) -> dict:
    """Bytes on disk under an index directory: the store's LMDB, its array files (Fisher
    cache, preconditioner), the FAISS files and the rest."""
    parts = dict(store_lmdb=0, store_arrays=0, faiss=0, other=0)
    for f in out.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(out).parts
        key = ("store_arrays" if "arrays" in rel[:-1] else "store_lmdb") if rel[0] == "sketches" \
            else "faiss" if f.suffix == ".faiss" else "other"
        parts[key] += f.stat().st_size
    return parts


def predict(res: dict, model=None, rates_key: str = "rates") -> dict:
    """The plan's prediction for a recorded run, from its inputs and the rates measured before
    it (``rates_key`` "rates_after": those measured right after it; ``model``: the model or a
    meta-device copy, for its FLOPs)."""
    from grass_index import plan as plan_mod

    from grass_index.plan import costs

    i = res["inputs"]
    if model is None:
        model = meta_gpt2(i.get("n_layer", 12))
    rule = costs.uses_low_rank
    if res["dense"]:  # the dense form forced (as the child forced it on the pipeline)
        costs.uses_low_rank = lambda n, k: False
    try:
        p = plan_mod.plan_for(model, i["n"], batch_size=i["batch_size"], tokens=i["tokens"],
                              hessian=i["hessian"], damping=i["damping"], **i["specs"])
    finally:
        costs.uses_low_rank = rule
    if p.index_width != res["index_dim"]:  # price the index the build chose (half its RAM)
        p = dataclasses.replace(p, index_width=res["index_dim"],
                                index_disk=float(i["n"]) * res["index_dim"] * p.index_bytes)
    rates = plan_mod.Rates(**res[rates_key])
    t = plan_mod.predict_seconds(model, {x.name: x.k for x in p.layers}, n=i["n"],
                                 tokens=i["tokens"], batch_size=i["batch_size"],
                                 hessian=i["hessian"], rates=rates, plan=p)
    return dict(plan_s=t, plan_ram_gb=p.ram_peak / 1e9, plan_ram1_gb=p.ram_pass1 / 1e9,
                plan_ram2_gb=p.ram_pass2 / 1e9, plan_disk_gb=p.disk / 1e9,
                plan_width=p.index_width,
                plan_disk_parts=dict(store=p.store_disk, fisher=p.fisher_disk,
                                     precond=p.precond_disk, index=p.index_disk))


def meta_gpt2(n_layer: int = 12):
    """GPT-2 small's shapes on the meta device (no storage): what `plan` prices."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer))


def _epoch(model, data, task, batch_size: int) -> float:
    """Seconds of one training epoch over ``data`` in the build's batches: forward + backward
    with weight gradients (no optimizer step; the weights stay as the build sees them)."""
    t0 = time.time()
    for lo in range(0, len(data), batch_size):
        batch = task.collate([data[i] for i in range(lo, min(len(data), lo + batch_size))])
        task.loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
    return time.time() - t0


def _float32_vs_float64(out: Path, cfg: dict, layers: int = 2) -> dict:
    """Scores of stored sketches (as queries) against stored sketches, through float32 and
    float64 inverses of the first ``layers`` layers: the largest relative difference."""
    import numpy as np

    from grass_index.precondition.preconditioner import _inverse_in_place
    from grass_index.precondition import parse_damping
    from grass_index.store import SketchStore

    mode, value = parse_damping(None)
    worst, start = 0.0, 0
    with SketchStore.open(out / "sketches") as st:
        G = st.get_rows(np.arange(min(st.num_rows, 64)))
        for name, k in list(cfg["layout"].items())[:layers]:
            g = G[:, start:start + k].astype(np.float64)
            start += k
            F = np.array(st.get_array(f"fisher/{name}"), dtype=np.float64)
            lam = value * np.trace(F) / k
            A = F.copy()
            A.flat[:: k + 1] += lam
            s64 = g @ np.linalg.solve(A, g.T)
            inv32, _ = _inverse_in_place(name, F, mode, value)
            s32 = (g.astype(np.float32) @ inv32 @ g.astype(np.float32).T).astype(np.float64)
            worst = max(worst, float(np.abs(s32 - s64).max() / np.abs(s64).max()))
    return {"float32_inverse_rel_err": worst}


def _phase_table(r: dict) -> None:
    """Each phase beside the training epoch (and the plan's time prediction)."""
    ep = r.get("epoch_s")
    print(f"load average {', '.join(f'{x:.1f}' for x in r['load'])}")
    print(f"{'phase':10}{'seconds':>9}{'x epoch':>9}{'plan (s)':>10}")
    plan = r["plan_s"]
    rows = [("epoch", ep, None), ("start", r["start_s"], None),
            ("check", r["check_s"], plan["check"]), ("pass 1", r["pass1_s"], plan["pass1"]),
            ("pass 2", r["pass2_s"], plan["pass2"]),
            ("build", r["total_s"], plan["check"] + plan["pass1"] + plan["pass2"])]
    for name, s, p in rows:
        if s is None:
            continue
        ratio = f"{s / ep:.2f}" if ep else "-"
        print(f"{name:10}{s:>9.1f}{ratio:>9}{'-' if p is None else f'{p:.1f}':>10}")
    print(f"peak RSS {r['peak_rss_gb']:.2f} GB (after the epoch {r['rss_epoch_gb']:.2f} GB), "
          f"disk {r['disk_gb']:.2f} GB; plan: time from {plan['basis']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--hessian", default="eFIM")
    ap.add_argument("--damping", default=None)
    ap.add_argument("--n-layer", type=int, default=12, help="GPT-2 blocks (12: GPT-2 small)")
    ap.add_argument("--sparsification", default=None)
    ap.add_argument("--projection", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--no-epoch", action="store_true", help="skip the training epoch")
    ap.add_argument("--keep", default=None, help="build here and keep it (default: a temp dir)")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = args.keep or tmp
        cmd = [sys.executable, __file__, "--child", "--work", work, "--n", str(args.n),
               "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
               "--hessian", args.hessian, "--n-layer", str(args.n_layer)]
        if args.damping:
            cmd += ["--damping", args.damping]
        for flag in ("sparsification", "projection"):
            if getattr(args, flag):
                cmd += [f"--{flag}", getattr(args, flag)]
        cmd += ["--dense"] * args.dense + ["--no-epoch"] * args.no_epoch
        # as the CLI runs (grass_index/__init__.py): idle OpenMP threads sleep, not spin
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(f"build failed:\n{p.stderr[-4000:]}")
        r = json.loads(line[0][7:])
    path = "dense Fisher (forced)" if r["dense"] else "default (low-rank where n < k)"
    print(f"GPT-2 small, {r['layers']} layers, K = {r['K']:,}, n = {r['n']} × T = {r['tokens']}"
          f", hessian {r['hessian']} {r['specs'] or ''}, pass-2 path: {path}; load average "
          f"{r['load'][0]:.1f} {r['load'][1]:.1f}")
    print(f"{'':28}{'plan':>10}{'measured':>12}")
    print(f"{'peak RSS (GB)':28}{r['plan_ram_gb']:>10.2f}{r['peak_rss_gb']:>12.2f}")
    if "peak_anon_gb" in r:  # what the plan prices: VmHWM also counts the store's page cache
        print(f"{'  of it anonymous (GB)':28}{r['plan_ram_gb']:>10.2f}{r['peak_anon_gb']:>12.2f}")
    print(f"{'disk at --out (GB)':28}{r['plan_disk_gb']:>10.2f}{r['disk_gb']:>12.2f}"
          f"   ({r['disk_gb'] * 1e9 / r['sketch_bytes']:.2f}× the {r['sketch_bytes'] / 1e9:.3f} GB "
          "of sketches it holds)")
    m = r["marks"]
    print("pass 2 stages (s from start): " + ", ".join(f"{k} {v:.0f}" for k, v in m.items()))
    print(f"pass 1 {r['pass1_s']:.1f} s, pass 2 {r['pass2_s']:.1f} s "
          f"(ratio {r['pass2_s'] / r['pass1_s']:.2f}), total {r['total_s']:.1f} s")
    _phase_table(r)
    if "float32_inverse_rel_err" in r:
        print(f"float32 vs float64 inverse: max relative score difference "
              f"{r['float32_inverse_rel_err']:.2e}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
