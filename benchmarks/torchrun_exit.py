"""How often does a 2-rank torchrun build die at exit, with and without
``distributed._bind_world_defaults`` (torch.distributed.nn.functional imported before the group
exists, so its ``group=group.WORLD`` defaults do not keep the group alive)? Each run is a real ``torchrun --nproc_per_node=2 -m grass_index build`` of a
tiny MLP task; a rank that exits by SIGABRT ("terminate called without an active exception")
makes the run fail although the index was committed.

    PYTHONPATH=$PWD python3 benchmarks/torchrun_exit.py [--runs 40]

The two variants alternate run by run, so machine load falls on both alike. The baseline
runs this file as each rank's entry point with ``--unfixed``: it turns ``_bind_world_defaults``
into a no-op before calling the same CLI, as the code stood before the fix.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(task: Path, out: Path, fixed: bool) -> int:
    entry = ["-m", "grass_index"] if fixed else [str(Path(__file__).resolve()), "--unfixed"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_port()}", *entry,
           "build", str(task), "--out", str(out), "--sparsification", "random_mask-4*3",
           "--projection", "sjlt-8", "--batch-size", "8", "--index", "ivf:fp16,shards=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode


def main():
    if "--unfixed" in sys.argv:  # a rank of the baseline
        sys.argv.remove("--unfixed")
        from grass_index.pipeline.parallel import distributed
        from grass_index.cli.main import main as cli

        distributed._bind_world_defaults = lambda: None
        sys.argv[0] = "grass-index"
        return cli()
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    from _tiny_task import write_task

    failed = {True: 0, False: 0}
    with tempfile.TemporaryDirectory() as tmp:
        task = write_task(Path(tmp), n_train=45)
        for i in range(args.runs):
            for fixed in (True, False):
                out = Path(tmp) / f"idx-{i}-{fixed}"
                failed[fixed] += one_run(task, out, fixed) != 0
    print("| group freed by close() | runs | failed at exit | load avg |\n|---|---|---|---|")
    load = os.getloadavg()[0]
    for fixed in (False, True):
        print(f"| {'yes (_bind_world_defaults)' if fixed else 'no (before the fix)'} | "
              f"{args.runs} | {failed[fixed]} | {load:.1f} |")


if __name__ == "__main__":
    main()
