"""Thread counts. FAISS and torch share one OpenMP runtime here: faiss.omp_set_num_threads also
changes torch.get_num_threads(). Nothing in grass-index calls this implicitly, so a process's
own torch.set_num_threads / OMP_NUM_THREADS choice stands; call it explicitly to change both.
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
