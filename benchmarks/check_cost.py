"""Where the capture check's time goes (the fixed cost before pass 1, issue 21), beside one
training step over the same batch.

    PYTHONPATH=$PWD nice -n 15 python3 benchmarks/check_cost.py [--task gpt2|digits|both]
        [--repeats 3] [--threads 2] [--compare OTHER_CHECKOUT]

Each run is a fresh child process (so imports such as torch._dynamo are paid as a build pays
them) that loads the model, times one training step on the build's first batch (8 examples:
forward + backward with weight gradients), then the build's preparation (``_Prepared``:
the loss check, the capture check, the build record with the model fingerprint). The check's
phases are timed by wrapping the functions that exist in the checkout under test, so the same
script measures an older checkout (``--compare``: its children run with that PYTHONPATH,
alternating with this one's). Printed: the minimum over the repeats of each phase's wall
seconds, the ratio check / step, and the load average (1 min) around the runs.

GPT-2 small is ``GPT2Config()`` with random weights (benchmarks/_gpt2_task.py), T = 64; digits
is the default task (grass_index/examples/digits.py), a 64-64-10 MLP.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# (label, module, attribute): wrapped when present; nested calls count in each enclosing
# phase (e.g. the vmap attempt inside "references")
PHASES = [
    ("loss check (no-grad fwd)", "grass_index.pipeline.run", "check_loss"),
    ("capture check, total", "grass_index.capture.check", "run_check"),
    ("  hooked fwd+bwd", "grass_index.capture.sketcher", "GradientSketcher._forward_backward"),
    ("  sketch formed grads (before)", "grass_index.capture.sketcher",
     "GradientSketcher._compress_formed"),
    ("  sketch formed grads (after)", "grass_index.capture.check", "_sketch_grads"),
    ("  references", "grass_index.capture.check", "_references"),
    ("    torch.func vmap try", "grass_index.capture._batch", "_vmap_grads"),
    ("    one-at-a-time loop", "grass_index.capture._batch", "_loop_grads"),
    ("  choose layouts", "grass_index.capture.check", "_choose_layout"),
    ("  exact route", "grass_index.capture.check", "_check_exact_route"),
    ("build record (fingerprint)", "grass_index.pipeline.run", "make_build_record"),
]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _wrap(spent: dict, label: str, module: str, attr: str) -> None:
    import importlib

    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    fn = getattr(owner, name, None)
    if fn is None:
        return
    spent[label] = [0.0, 0.0]

    def timed(*a, **k):
        t, c = time.perf_counter(), _cpu()
        try:
            return fn(*a, **k)
        finally:
            spent[label][0] += time.perf_counter() - t
            spent[label][1] += _cpu() - c

    setattr(owner, name, timed)


def _task(name: str, work: Path):
    if name == "digits":
        import grass_index.examples.digits as task

        return task
    from _gpt2_task import gpt2_task

    return gpt2_task(work, 64, 64)


def child(task_name: str, work: Path, threads: int) -> dict:
    t0, c0 = time.perf_counter(), _cpu()
    import grass_index  # noqa: F401  (first, as the CLI: it sets OMP_WAIT_POLICY)
    import torch
    from grass_index.pipeline.options import BuildOptions
    from grass_index.pipeline.run import _Prepared

    torch.set_num_threads(threads)
    task = _task(task_name, work)
    model, data = task.model(), task.train_data()
    collate = getattr(task, "collate", None)
    items = [data[i] for i in range(8)]
    batch = collate(items) if collate else torch.utils.data.default_collate(items)
    res = {"import + load": [time.perf_counter() - t0, _cpu() - c0]}
    for _ in range(2):  # the second step: the first one allocates
        t, c = time.perf_counter(), _cpu()
        task.loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
        res["training step (8 ex.)"] = [time.perf_counter() - t, _cpu() - c]
    spent: dict[str, list] = {}
    for label, module, attr in PHASES:
        _wrap(spent, label, module, attr)
    dynamo = "torch._dynamo" in sys.modules
    t, c = time.perf_counter(), _cpu()
    _Prepared(model, data, task.loss, BuildOptions(batch_size=8), collate=collate, device=None)
    res["prepare, total"] = [time.perf_counter() - t, _cpu() - c]
    res.update(spent)
    res["imports torch._dynamo (1 = yes)"] = [float("torch._dynamo" in sys.modules and not dynamo)] * 2
    return res


def _run(root: Path, task: str, work: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    p = subprocess.run([sys.executable, __file__, "--child", work, "--task", task,
                        "--threads", str(threads)], capture_output=True, text=True, env=env,
                       cwd=root)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        sys.exit(f"child failed:\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])


def _table(task: str, runs: dict[str, list[dict]], loads: list[float]) -> None:
    from _table import markdown_table

    labels = list(dict.fromkeys(k for rs in runs.values() for r in rs for k in r))
    cols = list(runs)
    # min over the runs, wall and CPU seconds separately
    best = {c: {k: [min(r[k][j] for r in runs[c]) for j in (0, 1)] for k in labels
                if k in runs[c][0]} for c in cols}
    rows = [[k, *[" / ".join(f"{v:.2f}" for v in best[c][k]) if k in best[c] else "–"
                  for c in cols]] for k in labels]
    for what, key in (("check / step", "capture check, total"), ("prepare / step", "prepare, total")):
        rows.append([what, *[" / ".join(f"{best[c][key][j] / best[c]['training step (8 ex.)'][j]:.2f}"
                                       for j in (0, 1)) for c in cols]])
    if len(cols) == 2:
        for key in ("capture check, total", "prepare, total"):
            a, b = (best[c][key] for c in cols)
            rows.append([f"{key}: {cols[1]} / {cols[0]}", "",
                         " / ".join(f"{b[j] / a[j]:.2f}" for j in (0, 1))])
    n = len(next(iter(runs.values())))
    print(f"\n{task}: min of {n} runs, wall / CPU seconds; load average (1 min) "
          f"{min(loads):.1f}–{max(loads):.1f}")
    print(markdown_table(["phase", *cols], rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("gpt2", "digits", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", default=None, help="another checkout, run alternately")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        res = child(args.task, Path(args.child), args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return
    roots = {"this": ROOT}
    if args.compare:
        roots = {"compare": Path(args.compare).resolve(), "this": ROOT}
    tasks = ["gpt2", "digits"] if args.task == "both" else [args.task]
    with tempfile.TemporaryDirectory() as work:
        for task in tasks:
            runs: dict[str, list[dict]] = {k: [] for k in roots}
            loads = [os.getloadavg()[0]]
            for _ in range(args.repeats):
                for k, root in roots.items():
                    runs[k].append(_run(root, task, work, args.threads))
                    loads.append(os.getloadavg()[0])
            _table(task, runs, loads)


if __name__ == "__main__":
    main()
