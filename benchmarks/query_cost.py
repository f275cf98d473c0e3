"""What one `grass-index query` costs beyond the model and the query's gradient (issue 21: ≤ 2 s).

    PYTHONPATH=$PWD python3 benchmarks/query_cost.py --index WORK/idx --work WORK [--reps 3]

WORK is a directory ``benchmarks/lm.py --keep WORK`` built (GPT-2 small, its corpus, the index
in WORK/idx). Each row runs in a fresh process, ``--reps`` times (the minimum is shown, since the
machine is shared):

- ``baseline``: import grass_index, load the model through the task, one forward + backward on
  query example 0 — what any query must pay;
- ``grass-index query``: the CLI end to end (``--example 0 --json``);
- then, inside one process, where the query's time goes: imports, model load, opening the
  index, the query sketcher (checking the model — its weights hashed, timed apart, beside the
  one-thread sha256 older indexes recorded — and drawing the projections), the query's gradient and the search (the preconditioner and the
  re-rank included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "examples" / "hf_causal_lm.py"

BASELINE = f"""
import sys, time, importlib.util
t0 = time.perf_counter()
import grass_index
spec = importlib.util.spec_from_file_location("task", {str(TASK)!r})
task = importlib.util.module_from_spec(spec); spec.loader.exec_module(task)
model = task.model()
batch = task.collate([task.query_data()[0]])
task.loss(model, batch).sum().backward()
print("BASELINE", time.perf_counter() - t0)
"""

BREAKDOWN = f"""
import json, sys, time, importlib.util
marks = {{}}
t = time.perf_counter()
def mark(name):
    global t
    now = time.perf_counter(); marks[name] = now - t; t = now
import grass_index as gi
mark("import grass_index")
spec = importlib.util.spec_from_file_location("task", {str(TASK)!r})
task = importlib.util.module_from_spec(spec); spec.loader.exec_module(task)
items = [task.query_data()[0]]
mark("import task + data")
model = task.model()
mark("model load")
idx = gi.open_index(sys.argv[1])
mark("open index")
from grass_index.indexdir import fingerprints as fp
if hasattr(fp, "legacy_model_hash"):  # the one-thread sha256 older indexes record, side by side
    fp.legacy_model_hash(model)
    mark("  (the model hash before: one-thread sha256)")
fp.model_hash(model)
mark("  of which: hashing the model (the check's)")
sk = idx.query_sketcher(model)
mark("query sketcher (model check + projections)")
q = idx.query_sketches(model, items, task.loss, collate=task.collate, sketcher=sk)
mark("the query's gradient, sketched")
idx.search(q, 10)
mark("search (preconditioner + re-rank)")
idx.search(q, 10)
mark("second search")
print("MARKS " + json.dumps(marks))
"""


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{p.stderr[-3000:]}")
    return wall, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--work", required=True, help="the directory benchmarks/lm.py --keep used")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    env = dict(os.environ, GRASS_INDEX_MODEL_PATH=str(work / "gpt2"),
               GRASS_INDEX_TEXT_FILE=str(work / "train.txt"),
               GRASS_INDEX_MAX_LENGTH=str(args.tokens))
    cli = [sys.executable, "-m", "grass_index", "query", args.index, "--task", str(TASK),
           "--example", "0", "--json"]
    base, query, marks = [], [], []
    for _ in range(args.reps):  # interleaved, so a load spike hits both alike
        base.append(_run([sys.executable, "-c", BASELINE], env)[0])
        query.append(_run(cli, env)[0])
        out = _run([sys.executable, "-c", BREAKDOWN, args.index], env)[1]
        marks.append(json.loads(out.split("MARKS ", 1)[1]))
    du = sum(f.stat().st_size for f in Path(args.index).rglob("*") if f.is_file())
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f}; index {args.index} "
          f"({du / 1e9:.3f} GB on disk); min of {args.reps} runs, each a fresh process")
    print(f"{'baseline: import + model + one gradient':44}{min(base):8.2f} s")
    print(f"{'grass-index query (end to end)':44}{min(query):8.2f} s")
    print(f"{'  beyond the baseline':44}{min(query) - min(base):8.2f} s")
    print("where a query's time goes (one process, min over runs):")
    for name in marks[0]:
        print(f"  {name:42}{min(m[name] for m in marks):8.2f} s")
    print(json.dumps(dict(baseline_s=base, query_s=query, marks=marks, disk_bytes=du,
                          load=os.getloadavg())))


if __name__ == "__main__":
    main()
