"""The pipeline: the build end to end and the query side, behind a small public API.

    run.build / run.build_shard / run.merge_shards / run.refit_index   (BuildOptions,
    IndexOptions in; BuildResult / ShardInfo out), read_config + IndexConfig (config.json),
    verify_index, describe_index, load_examples (.pt/.npy/.npz example files), Progress.

An index directory holds

    build.json      what the raw sketches depend on (specs, seed, layers, model/data hashes);
                    written once when the build starts, so a re-run can resume or refuse
    sketches/       LMDB store: raw sketches in blocks of ``batch_size`` rows (pass 1), the
                    per-layer Fisher matrices and the preconditioner (pass 2), the config
    index-KEY.faiss inner-product index over the preconditioned sketches (ids = train ids);
                    with ``--index ...,shards=N``: index-KEY-I-of-N.faiss, searched as one
    config.json     the self-describing config; written last and atomically, so an index
                    is complete exactly when config.json exists
    shards/I-of-N/  only for split builds (`build --worker I/N`, torchrun): worker I's raw
                    sketches (batches b with b % N == I) and their Fisher sums; the merge
                    copies the sketches into sketches/ and adds up the sums

Modules, in data-flow order (each imports only from the ones above it):

    errors.py       AttributionError
    files.py        directory layout names (JSON and atomic writes: grass_index.fileio)
    fingerprints.py hashes of configs, models and data; layer dims; item signatures
    options.py      BuildOptions, IndexOptions and their checks
    record.py       build.json: the build record, claiming an output directory, batch count
    config.py       config.json: reading/validating it, IndexConfig (typed read-only view)
    progress.py     Progress: rich bars on a terminal, periodic lines in a log, or a callback
    sketching.py    pass 1: fixed batches -> raw sketches (training set into the store; queries)
    stored.py       reading the store back: row chunks, preconditioned vectors, state arrays
    pass2.py        pass 2: Fisher -> preconditioner -> FAISS -> config.json; refit
    sharding.py     split builds: one worker's shard (pass 1 on its batches); merge + pass 2
    distributed.py  torch.distributed (torchrun) builds: every rank a worker and a pass-2 part
    querying.py     the query side: model check, query sketches, opening store/FAISS/preconditioner
    run.py          a build end to end: build, build_shard, merge_shards, refit_index;
                    check_capture (`build --check`: the capture check alone)
    verify.py       verify_index (and repair)
    describe.py     describe_index (finished config or build progress)
    inputs.py       load_examples: example files for query/score

The user-facing API (build_index, open_index, AttributionIndex, ...) is ``grass_index.attribute``.
"""
from .config import IndexConfig, read_config
from .describe import describe_index
from .errors import AttributionError
from .files import BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, MASK_FILE, SHARDS_DIR, STORE_DIR
from .fingerprints import config_hash
from .inputs import load_examples
from .options import (HESSIANS, INDEX_KINDS, BuildOptions, IndexOptions, check_damping,
                      check_index, norm_hessian)
from .progress import Progress
from .run import (BuildResult, CaptureCheck, ShardInfo, build, build_shard, check_capture,
                  merge_shards, refit_index)
from .sharding import parse_worker
from .stored import state_from_array, state_to_array
from .verify import verify_index

__all__ = [
    "AttributionError", "BUILD_FILE", "BuildOptions", "BuildResult", "CaptureCheck",
    "CONFIG_FILE", "check_capture",
    "FORMAT_VERSION", "HESSIANS", "INDEX_KINDS", "IndexConfig", "IndexOptions", "MASK_FILE",
    "Progress", "SHARDS_DIR", "STORE_DIR", "ShardInfo", "build", "build_shard", "check_damping",
    "check_index", "config_hash", "describe_index", "load_examples", "merge_shards",
    "norm_hessian", "parse_worker", "read_config", "refit_index", "state_from_array",
    "state_to_array", "verify_index",
]
