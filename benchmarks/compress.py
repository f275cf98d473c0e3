"""Throughput of per-sample gradient compression for one linear layer, at equal output k=4096.

    python benchmarks/compress.py [--backend inductor|aot_eager|none] [--device cpu|cuda] [--quick]

Methods (all sum over tokens, i.e. sketch G_b = sum_t grad_out[b,t] x[b,t]^T):
  naive      materialise G_b [d_out*d_in], then a Gaussian projection to k. The d*k matrix does
             not fit in memory (GPT-2 layer: 36 GiB, Llama layer: 688 GiB), so it is drawn in
             seeded row chunks each batch; we time a few chunks and extrapolate (marked '~').
  LoGra      normal-64*64 on each factor, outer-product sum (k = 64*64 = 4096).
  FactGraSS  random_mask-128*128 on each factor, outer-product sum, sjlt-4096.
Eager and torch.compile(fullgraph=True) versions. Prints one table; the last column is the
FactGraSS/LoGra throughput ratio (goal >= 2.5x).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from _table import markdown_table  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grass_index.compress import FactGraSS, LoGra  # noqa: E402
from grass_index.compress.seeding import generator  # noqa: E402

K = 4096
LAYERS = {"GPT-2 MLP (768->3072, T=128, B=8)": (768, 3072, 128, 8),
          "Llama MLP (4096->11008, T=64, B=2)": (4096, 11008, 64, 2)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, min_time=1.0, rounds=1) -> float:
    """Seconds per call: median of torch.utils.benchmark's blocked runs, best of ``rounds``
    (the best round filters out load from other processes on a shared machine)."""
    fn()
    sync(device)
    return min(Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median
               for _ in range(rounds))


def naive_seconds(x, g, device, chunk=8192, chunks_timed=2) -> tuple[float, str]:
    """Materialise G, then project with seeded Gaussian chunks; extrapolate the chunk loop."""
    B, _, d_in = x.shape
    d = d_in * g.shape[-1]

    def materialise():
        return torch.bmm(g.transpose(1, 2), x).reshape(B, d)

    t_mat = bench(materialise, device, min_time=0.5)
    G = materialise()
    out = torch.zeros(B, K, device=device)
    n_chunks = -(-d // chunk)
    sync(device)
    t = time.perf_counter()
    for c in range(chunks_timed):
        gen = generator(0, f"naive.{c}")
        P = torch.randn(chunk, K, generator=gen).to(device) / K ** 0.5
        out += G[:, c * chunk:(c + 1) * chunk] @ P
    sync(device)
    t_chunks = (time.perf_counter() - t) / chunks_timed * n_chunks
    note = f"P would need {d * K * 4 / 2**30:.0f} GiB; {chunks_timed}/{n_chunks} chunks timed"
    return t_mat + t_chunks, note


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    has_cxx = shutil.which(os.environ.get("CXX", "g++")) is not None
    ap.add_argument("--backend", default="inductor" if has_cxx else "aot_eager",
                    choices=["inductor", "aot_eager", "none"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="GPT-2 layer only, no naive baseline")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best is kept)")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"compile backend {args.backend}, k={K}", flush=True)

    rows = []
    for name, (d_in, d_out, T, B) in LAYERS.items():
        if args.quick and not name.startswith("GPT"):
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, T, d_in, generator=g).to(device)
        go = torch.randn(B, T, d_out, generator=g).to(device)
        if not args.quick:
            secs, note = naive_seconds(x, go, device)
            rows.append((name, "naive (materialise + Gaussian)", "eager", f"~{B / secs:.3g}", "", note))
            print(rows[-1], flush=True)
        mods = {"LoGra normal-64*64": LoGra(d_in, d_out, "normal-64*64", "identity").to(device),
                "FactGraSS random_mask-128*128 -> sjlt-4096":
                    FactGraSS(d_in, d_out, "random_mask-128*128", "sjlt-4096").to(device)}
        modes = ["eager"] + ([args.backend] if args.backend != "none" else [])
        for mode in modes:
            fns, compile_s = {}, {}
            for label, mod in mods.items():
                assert mod.k == K
                fns[label] = mod if mode == "eager" else torch.compile(mod, fullgraph=True, backend=mode)
                t0 = time.perf_counter()
                with torch.no_grad():
                    fns[label](x, go)  # compile (not timed)
                compile_s[label] = time.perf_counter() - t0
            secs = {label: float("inf") for label in mods}
            with torch.no_grad():
                for _ in range(args.rounds):  # interleaved, best of rounds: robust to machine load
                    for label, fn in fns.items():
                        secs[label] = min(secs[label], bench(lambda fn=fn: fn(x, go), device))
            tput = {label: B / s for label, s in secs.items()}
            for label in mods:
                ratio = f"{tput[label] / tput['LoGra normal-64*64']:.2f}x" if "FactGraSS" in label else ""
                note = f"{secs[label] * 1e3:.2f} ms/batch"
                note += f", compile {compile_s[label]:.1f}s" if mode != "eager" else ""
                rows.append((name, label, mode, f"{tput[label]:.4g}", ratio, note))
                print(rows[-1], flush=True)

    header = ("layer", "method", "mode", "examples/s", "FactGraSS/LoGra", "notes")
    print()
    print(markdown_table(header, rows))

if __name__ == "__main__":
    main()
