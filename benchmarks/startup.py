"""Why a build's start-up (model loaded -> `plan:` line) slows far more than the load average
under contention, and what OMP_WAIT_POLICY=PASSIVE (grass_index/__init__.py) buys.

    PYTHONPATH=$PWD python3 benchmarks/startup.py [--threads 2] [--repeats 1]

The start-up is the capture check (pipeline/run.py ``_Prepared``: a no-grad forward of the loss
check, one hooked forward + backward with weight gradients on 4 examples, and one single-example
gradient as the exact reference) plus the model fingerprint. Each child process (one per
OpenMP wait policy, so the policy is read before torch loads its OpenMP runtime) times one
training step of 8 examples (forward + backward with weight gradients) beside that
preparation: wall seconds, CPU seconds (user + system) and the load average, so the ratio
prepare/step is comparable across runs on a shared machine.
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


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(work: Path, threads: int) -> dict:
    from _gpt2_task import gpt2_task

    import torch  # before grass_index: the OpenMP runtime reads OMP_WAIT_POLICY as it loads


    from grass_index.pipeline.options import BuildOptions
    from grass_index.pipeline.run import _Prepared

    torch.set_num_threads(threads)
    task = gpt2_task(work, 64, 64)
    model, data = task.model(), task.train_data()
    batch = task.collate([data[i] for i in range(8)])
    res = {}
    for what in ("step", "prepare"):
        w, c = time.time(), _cpu()
        if what == "step":
            model.zero_grad()
            task.loss(model, batch).sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            _Prepared(model, data, task.loss, BuildOptions(batch_size=8), collate=task.collate,
                      device=None)
        res[what] = dict(wall=time.time() - w, cpu=_cpu() - c, load=os.getloadavg()[0])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(Path(args.child), args.threads)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for rep in range(args.repeats):
            for policy in ("(unset)", "PASSIVE"):
                env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
                if policy != "(unset)":
                    env["OMP_WAIT_POLICY"] = policy
                p = subprocess.run([sys.executable, __file__, "--child", work, "--threads",
                                    str(args.threads)], capture_output=True, text=True, env=env)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    sys.exit(f"child failed:\n{p.stderr[-3000:]}")
                rows.append((policy, json.loads(line[0][7:])))
    print(f"GPT-2 small, T = 64, {args.threads} torch threads; load average at the end of each")
    print(f"{'OMP_WAIT_POLICY':16}{'step wall':>10}{'step cpu':>10}{'prep wall':>10}"
          f"{'prep cpu':>10}{'prep/step':>10}{'load':>6}")
    for policy, r in rows:
        s, p = r["step"], r["prepare"]
        print(f"{policy:16}{s['wall']:>10.1f}{s['cpu']:>10.1f}{p['wall']:>10.1f}{p['cpu']:>10.1f}"
              f"{p['wall'] / s['wall']:>10.2f}{p['load']:>6.1f}")


if __name__ == "__main__":
    main()
