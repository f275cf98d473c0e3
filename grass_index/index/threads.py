"""Thread counts: FAISS (OpenMP) and torch each default to every core they see; running one
after the other is fine, but both at full width in one process oversubscribes small machines.
"""
from __future__ import annotations

import os

import faiss


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects taskset/cgroup cpusets
    except AttributeError:  # macOS / Windows
        return max(1, os.cpu_count() or 1)


def configure_threads(n: int | None = None, *, torch_too: bool = False) -> int:
    """Set FAISS (and optionally torch) to ``n`` threads (default: CPUs this process may use).

    An explicit ``OMP_NUM_THREADS`` wins when ``n`` is None, so users keep control.
    """
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS")
        n = int(env) if env and env.isdigit() and int(env) > 0 else available_cpus()
    faiss.omp_set_num_threads(n)
    if torch_too:
        import torch
        torch.set_num_threads(n)
    return n
