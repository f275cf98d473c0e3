"""FAISS on a GPU when there is one: chosen at run time, never required.

The faiss-gpu wheel (pip install 'grass-index[gpu]') imports and runs CPU indexes on a machine
without a GPU (``get_num_gpus() == 0``); faiss-cpu has no ``get_num_gpus`` at all. Searching
copies the CPU index to GPU 0 once (``index_cpu_to_gpu``) and keeps it beside the CPU one, which
stays what is saved. GPU FAISS selects at most ``GPU_MAX_K`` results per query; larger k, IVF
searches with a per-call nprobe, or any failure to copy fall back to the CPU index.
"""
from __future__ import annotations

import logging

import faiss

log = logging.getLogger("grass_index")
GPU_MAX_K = 2048
_resources = None


def gpu_count() -> int:
    """GPUs FAISS can use here (0 with faiss-cpu, or faiss-gpu on a machine without a GPU)."""
    fn = getattr(faiss, "get_num_gpus", None)
    try:
        return int(fn()) if fn is not None else 0
    except Exception:  # a broken CUDA runtime counts as no GPU
        return 0


def gpu_copy(index):
    """``index`` on GPU 0, or None when there is no GPU or FAISS cannot copy it."""
    global _resources
    if gpu_count() <= 0 or not hasattr(faiss, "StandardGpuResources"):
        return None
    try:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(_resources, 0, index)
    except Exception as e:  # e.g. an index type without a GPU version
        log.info("FAISS: searching on CPU (cannot copy the index to the GPU: %s)", e)
        return None
