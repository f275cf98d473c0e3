"""grass-index: training-data attribution with GraSS/FactGraSS gradient sketches.

    import grass_index as gi
    idx = gi.build_index(model, train_data, loss_fn, out="runs/x")
    idx.query(model, examples, loss_fn, k=10)

Heavy stages (LMDB, FAISS) load lazily, so `import grass_index.ops` stays light.
"""
from __future__ import annotations

import importlib
import os
import sys

if "torch" not in sys.modules:  # read once, when torch loads its OpenMP runtime
    # Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread
    # takes the core the working one needs (benchmarks/startup.py: under load 13 on 2 cores
    # the build's start-up took 90 s wall / 25 s CPU spinning, 27 s / 8 s passive).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .version import __version__  # noqa: E402
from . import ops  # noqa: E402,F401  (defines the custom ops, loads native kernels)
from .errors import GrassIndexError  # noqa: E402
from .ops import native_status  # noqa: E402

# public name -> module that defines it (imported on first access)
_LAZY = {
    "parse_spec": "grass_index.compress",
    "Spec": "grass_index.compress",
    "layer_seed": "grass_index.compress",
    "load_selective_mask": "grass_index.compress",
    "make_compressor": "grass_index.compress",
    "FactGraSS": "grass_index.compress",
    "LoGra": "grass_index.compress",
    "GraSS": "grass_index.compress",
    "build_index": "grass_index.attribute",
    "build_shard": "grass_index.attribute",
    "check_capture": "grass_index.attribute",
    "BuildOptions": "grass_index.pipeline",
    "IndexOptions": "grass_index.pipeline",
    "IndexConfig": "grass_index.indexdir",
    "IndexRecord": "grass_index.indexdir",
    "BuildRecord": "grass_index.indexdir",
    "open_index": "grass_index.attribute",
    "merge_shards": "grass_index.attribute",
    "add_examples": "grass_index.attribute",
    "add_shard": "grass_index.attribute",
    "remove_examples": "grass_index.attribute",
    "AttributionIndex": "grass_index.attribute",
    "AttributionError": "grass_index.attribute",
    "verify_index": "grass_index.attribute",
    "describe_index": "grass_index.attribute",
    "load_task": "grass_index.task",
    "hf_lm_task": "grass_index.tasks",
    "load_examples": "grass_index.query",
    "save_selective_mask": "grass_index.compress",
    "fit_selective_mask": "grass_index.maskfit",
    "MaskFitOptions": "grass_index.maskfit",
    "run_eval": "grass_index.eval",
    "Checkpoints": "grass_index.capture",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grass_index' has no attribute {name!r}")


__all__ = ["__version__", "GrassIndexError", "native_status", "ops", *_LAZY]
