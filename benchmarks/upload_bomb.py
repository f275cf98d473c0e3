"""What an inflating upload costs the server, with and without the input budget.

    python benchmarks/upload_bomb.py                 # a ~0.5 MiB .npz that inflates to 512 MiB
    python benchmarks/upload_bomb.py --mib 128

Builds an .npz whose one member (a float32 array of 64 features per row, all zeros) deflates
~1000:1, then loads it with `load_examples` (what `serve` runs on an upload) in a fresh
process per row: once as before (no budget), once with the budget `serve` derives for the
digits index (64 examples of 64 float32 + a label). Prints a markdown table: upload size,
what it unpacks to, the outcome, seconds, and the process's peak RSS before -> after.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

DIGITS_SIGNATURE = {"seq": [{"dtype": "float32", "tensor": [64]},
                            {"dtype": "int64", "tensor": []}]}


def inflating_npz(mib: int) -> bytes:
    from numpy.lib import format as npformat

    rows = (mib << 20) // (64 * 4)
    header = io.BytesIO()
    npformat.write_array_header_1_0(header, dict(descr="<f4", fortran_order=False,
                                                 shape=(rows, 64)))
    buf = io.BytesIO()
    block = bytes(1 << 22)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            for lo in range(0, rows * 256, len(block)):
                f.write(block[:min(len(block), rows * 256 - lo)])
    return buf.getvalue()


def load_once(path: str, budgeted: bool) -> dict:
    """In this (fresh) process: load the file as serve would, and report."""
    from grass_index.input_budget import InputBudget
    from grass_index.query.inputs import load_examples

    data = Path(path).read_bytes()
    kw = dict(budget=InputBudget.for_signature(DIGITS_SIGNATURE, 64)) if budgeted else {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    try:
        outcome = f"loaded {len(load_examples(data, name='q.npz', **kw))} examples"
    except Exception as e:  # the refusal is the point
        outcome = f"refused ({type(e).__name__})"
    return dict(outcome=outcome, seconds=time.perf_counter() - t0, rss0=rss0,
                rss1=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="what the member unpacks to")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(load_once(args.child[0], args.child[1] == "1")))
        return
    if not 1 <= args.mib <= 4096:
        raise SystemExit("keep it bounded: 1..4096 MiB")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"grass-index-bomb-{os.getpid()}.npz"
    path.write_bytes(inflating_npz(args.mib))
    rows = []
    try:
        for budgeted in (False, True):
            out = subprocess.run([sys.executable, __file__, "--child", str(path),
                                  str(int(budgeted))], check=True, capture_output=True,
                                 text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(["with the budget" if budgeted else "no budget (before)",
                         f"{path.stat().st_size / 1024:.0f} KiB", f"{args.mib} MiB",
                         r["outcome"], f"{r['seconds']:.2f}",
                         f"{r['rss0']:.0f} -> {r['rss1']:.0f}"])
    finally:
        path.unlink()
    print(markdown_table(["load_examples", "upload", "unpacks to", "outcome", "seconds",
                          "peak RSS MiB"], rows))
    print(f"\nload average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
