"""Selective Mask fit on GPT-2 small (random init, nothing downloaded): peak memory and time.

    PYTHONPATH=$PWD python3 benchmarks/selective_lm.py [--n 48] [--steps 10] [--tokens 64]
        [--k 64*64] [--memory-gb 2] [--layers 'transformer.h.0.*']

One fit per run, in a child process so its peak RSS (VmHWM) is its own. The fit takes one
layer at a time from per-token factors (input activations, output gradients), streaming the
sample in passes that hold only as many layers as fit in --memory-gb. Printed beside it: what
the previous fit planned to hold — every selected layer's exact per-example gradients at once,
n × Σ numel × 4 bytes — at this n and at the default n = 768.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _gpt2_task import gpt2_task, peak_rss_bytes  # noqa: E402
from _table import markdown_table  # noqa: E402


def child(args) -> dict:
    import torch

    from grass_index.capture import select_layers
    from grass_index.maskfit import fit_selective_mask

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    work = Path(args.work)
    task = gpt2_task(work, args.n, args.tokens)

    model, data = task.model(), task.train_data()
    layers = [p.strip() for p in args.layers.split(",")] if args.layers else None
    infos = select_layers(model, layers)
    stats: dict = {}
    t0 = time.time()
    masks = fit_selective_mask(model, data, task.loss, args.k, layers=layers, n_samples=args.n,
                               steps=args.steps, batch_size=args.batch_size,
                               memory_gb=args.memory_gb, collate=task.collate, stats=stats)
    total = time.time() - t0
    per_layer = {layer.name: dict(numel=layer.numel, **stats[layer.name]) for layer in infos}
    return dict(n=len(data), tokens=args.tokens, steps=args.steps, k=args.k,
                memory_gb=args.memory_gb, layers=len(infos), passes=stats["passes"],
                total_s=total, peak_rss_gb=peak_rss_bytes() / 1e9, per_layer=per_layer,
                model_bytes=sum(p.numel() * 4 for p in model.parameters()),
                kept={name: {key: len(v) for key, v in d.items()} for name, d in masks.items()})


def report(r: dict) -> None:
    n, numel = r["n"], sum(x["numel"] for x in r["per_layer"].values())
    fit_s = sum(x["seconds"] for x in r["per_layer"].values())
    print(f"GPT-2 small, {r['layers']} layers (Σ numel = {numel:,}), n = {n} × T = "
          f"{r['tokens']}, k = {r['k']}, {r['steps']} steps, --memory-gb {r['memory_gb']}, "
          f"{r['passes']} passes over the sample")
    kinds = defaultdict(list)
    for name, x in r["per_layer"].items():
        kinds[name.split(".")[-2] + "." + name.split(".")[-1] if name.count(".") >= 2
              else name].append(x)
    rows = []
    for kind, xs in kinds.items():
        x0 = xs[0]
        rows.append([kind, len(xs), f"{x0['numel']:,}", x0["route"],
                     f"{sum(x['held_bytes'] for x in xs) / len(xs) / 1e6:.0f}",
                     f"{n * x0['numel'] * 4 / 1e6:.0f}",
                     f"{sum(x['seconds'] for x in xs) / len(xs):.1f}"])
    print(markdown_table(["layer", "count", "numel", "route", "held per layer (MB)",
                          "exact grads per layer (MB)", "fit s / layer"], rows))
    old_n = n * numel * 4 / 1e9
    old_768 = 768 * numel * 4 / 1e9
    print()
    print(markdown_table(
        ["", f"this fit (n={n})", f"previous fit, planned (n={n})", "previous fit, planned (n=768)"],
        [["peak RSS (GB)", f"{r['peak_rss_gb']:.2f}", f"≥ {old_n:.1f}", f"≥ {old_768:.0f}"],
         ["ratio to this fit", "1", f"{old_n / r['peak_rss_gb']:.1f}×",
          f"{old_768 / r['peak_rss_gb']:.0f}×"]]))
    print(f"\ntotal {r['total_s']:.0f} s: fitting {fit_s:.0f} s "
          f"({fit_s / r['layers']:.1f} s per layer), capture passes {r['total_s'] - fit_s:.0f} s")
    print(json.dumps(r))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--k", default="64*64")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--memory-gb", type=float, default=2.0)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        cmd = [sys.executable, __file__, "--child", "--work", tmp, "--n", str(args.n),
               "--tokens", str(args.tokens), "--steps", str(args.steps), "--k", args.k,
               "--batch-size", str(args.batch_size), "--memory-gb", str(args.memory_gb)]
        if args.layers:
            cmd += ["--layers", args.layers]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(f"fit failed:\n{p.stderr[-4000:]}")
        report(json.loads(line[0][7:]))


if __name__ == "__main__":
    main()
