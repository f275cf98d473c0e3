"""The build: pass 1 (sketching), pass 2 (Fisher -> preconditioner -> FAISS -> config.json), in
one process, as `--worker I/N` shards + merge, or under torchrun, behind a small public API.

    run.build / run.build_shard / run.merge_shards / run.refit_index   (BuildOptions,
    IndexOptions in; BuildResult / ShardInfo out); check_capture (`build --check`), Progress.

What an index directory holds (its files and records, verify, describe) is
``grass_index.indexdir``; the query side is ``grass_index.query``. Modules, in data-flow order
(each imports only from the ones above it):

    errors.py       AttributionError (re-exported from indexdir/errors.py)
    options.py      BuildOptions, IndexOptions and their checks
    progress.py     Progress: rich bars on a terminal, periodic lines in a log, or a callback
    factors.py      EK-FAC's Kronecker factors (pass 1) and eigenbasis fit (pass 2)
    sketching.py    pass 1: fixed batches -> raw sketches (training set into the store; queries)
    pass2.py        pass 2: Fisher -> preconditioner -> FAISS -> config.json; refit
    parallel/       split builds: sharding.py (one worker's shard: pass 1 on its batches;
                    merge + pass 2), distributed.py (torchrun: every rank a worker and a
                    pass-2 part)
    run.py          a build end to end: build, build_shard, merge_shards, refit_index;
                    check_capture (`build --check`: the capture check alone)
    repair.py       verify_index: indexdir's checks, and repair (records, pass 2, blocks)

The user-facing API (build_index, open_index, AttributionIndex, ...) is ``grass_index.attribute``.
"""
from ..indexdir import (BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, MASK_FILE, SHARDS_DIR,
                        STORE_DIR, AttributionError, IndexConfig, config_hash, describe_index,
                        read_config, state_from_array, state_to_array)
from ..query import load_examples
from .options import (HESSIANS, INDEX_KINDS, BuildOptions, IndexOptions, check_damping,
                      check_index, norm_hessian)
from .progress import Progress
from .run import (BuildResult, CaptureCheck, ShardInfo, build, build_shard, check_capture,
                  merge_shards, refit_index)
from .repair import verify_index
from .parallel.sharding import parse_worker

__all__ = [
    "AttributionError", "BUILD_FILE", "BuildOptions", "BuildResult", "CaptureCheck",
    "CONFIG_FILE", "check_capture",
    "FORMAT_VERSION", "HESSIANS", "INDEX_KINDS", "IndexConfig", "IndexOptions", "MASK_FILE",
    "Progress", "SHARDS_DIR", "STORE_DIR", "ShardInfo", "build", "build_shard", "check_damping",
    "check_index", "config_hash", "describe_index", "load_examples", "merge_shards",
    "norm_hessian", "parse_worker", "read_config", "refit_index", "state_from_array",
    "state_to_array", "verify_index",
]
