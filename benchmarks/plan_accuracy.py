"""Does `grass-index plan` predict a build's time, RAM and disk within 25%? Builds of GPT-2
(random init, benchmarks/lm.py, one child process per build, no training epoch) beside the
plan for the same setting, its rates measured in that process just before the build:

    PYTHONPATH=$PWD python3 benchmarks/plan_accuracy.py [--cases n64,n256,dense,ekfac]
        [--results runs.jsonl]   # re-price recorded runs with the current plan code

Each build's record (its inputs, the rates measured before it, each phase's seconds, peak RSS
after pass 1 and at the end, bytes on disk by part) is appended to ``--results``; the table
re-prices every recorded run with the plan code as it is now, so a change to the pricing is
checked against the same measurements without re-running them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CASES = {  # name -> lm.py arguments
    "n64": ["--n", "64"],
    "n256": ["--n", "256"],
    # the dense path: n ≥ k (k = 256 on 2 blocks), and the dense form forced at k = 4096 (the
    # k of GPT-2 small's default spec, whose dense path a real corpus takes) on 2 blocks
    "dense": ["--n", "256", "--n-layer", "2", "--projection", "sjlt-256"],
    "dense4096": ["--n", "64", "--n-layer", "2", "--dense"],
    "ekfac": ["--n", "64", "--sparsification", "normal-64*64", "--projection", "identity",
              "--hessian", "ekfac"],
}


def run_case(name: str, work: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "lm.py"), "--child", "--work", tmp,
               "--tokens", "64", "--batch-size", "8", "--no-epoch", *CASES[name]]
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(f"{name}: build failed:\n{p.stderr[-4000:]}")
        r = json.loads(line[0][7:])
        r["case"] = name
        return r


def ratio(pred: float, meas: float, after: float | None = None) -> str:
    """plan / measured (error), and with ``after`` the plan at the rates measured after."""
    if not meas:
        return f"{pred:.2f} / -"
    tail = "" if after is None else f"; after {after / meas - 1:+.0%}"
    return f"{pred:.1f} / {meas:.1f} ({pred / meas - 1:+.0%}{tail})"


def table(records: list[dict]) -> None:
    from lm import predict

    print("| case | load | check s | pass 1 s | pass 2 s | peak RSS GB | disk GB | index |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        ta = predict(r, rates_key="rates_after")["plan_s"]
        r.update(predict(r))
        t = r["plan_s"]
        width = "exact" if r["index_dim"] == r["K"] else f"sketch {r['index_dim']}"
        planned = "exact" if r["planned_width"] == r["K"] else f"sketch {r['planned_width']}"
        print(f"| {r['case']} (n={r['n']}, K={r['K']:,}, {r['hessian']}, forms "
              f"{_forms(r)}) | {r['load'][0]:.1f} | "
              f"{ratio(t['check'], r['check_s'], ta['check'])} | "
              f"{ratio(t['pass1'], r['pass1_s'], ta['pass1'])} | "
              f"{ratio(t['pass2'], r['pass2_s'], ta['pass2'])} | "
              f"{ratio(r['plan_ram_gb'], r['peak_rss_gb'])} | "
              f"{ratio(r['plan_disk_gb'], r['disk_gb'])} | plan {planned}, built {width} |")
    print("\n(each cell: plan / measured (plan's error; the plan's error at the rates measured "
          "right after the build); load: 1-min load average at the end)")
    for r in records:
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["plan_s"]["pass2_stages"].items())
        marks = r["marks"]
        meas = ", ".join(f"{k} {marks[k + '_end'] - marks[k]:.1f}" for k in marks
                         if not k.endswith("_end") and k != "sketch")
        print(f"{r['case']}: pass 2 plan stages: {st}; measured stages: {meas}; RSS after "
              f"pass 1 {r['rss_pass1_gb']:.2f} GB (plan pass 1 {r['plan_ram1_gb']:.2f}, pass 2 "
              f"{r['plan_ram2_gb']:.2f}); disk {_gb(r['disk'])} vs plan "
              f"{_gb(r['plan_disk_parts'])}")


def _forms(r: dict) -> str:
    forms = list((r.get("forms") or {}).values())
    return "/".join(f"{forms.count(f)} {f}" for f in sorted(set(forms))) or "none"


def _gb(d: dict) -> str:
    return ", ".join(f"{k} {v / 1e9:.3f}" for k, v in d.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="n64,ekfac,dense,dense4096,n256")
    ap.add_argument("--results", default="plan_accuracy.jsonl")
    ap.add_argument("--work", default=None)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--all", action="store_true", help="every recorded run, not the latest")
    args = ap.parse_args()
    path = Path(args.results)
    if not args.table_only:
        for name in args.cases.split(","):
            r = run_case(name, args.work)
            with open(path, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{name}: done, load {os.getloadavg()[0]:.1f}", flush=True)
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not args.all:  # the latest run of each case (rates measured by the current code)
        records = list({r["case"]: r for r in records}.values())
    table(records)


if __name__ == "__main__":
    main()
