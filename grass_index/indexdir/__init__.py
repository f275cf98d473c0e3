"""The on-disk format of an index directory: its file names, its records (build.json,
config.json), fingerprints, reading the store back, verify and describe.

    files.py        every name an index directory may hold (JSON and atomic writes:
                    grass_index.fileio)
    errors.py       AttributionError
    fingerprints.py hashes of configs, models and data; layer dims; item signatures
    record.py       build.json: the build record, claiming an output directory, batch count
    records.py      BuildRecord (build.json) and IndexRecord (config.json): frozen, typed,
                    every field checked once, where it is read
    config.py       config.json: read_record (all checks, store agreement), read_config
    stored.py       reading the store back: row chunks, preconditioned vectors, state arrays
    describe.py     describe_index (finished config or build progress)
    verify.py       verify_index (and repair)
"""
from .config import IndexConfig, read_config, read_record
from .describe import describe_index
from .errors import AttributionError
from .files import BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, MASK_FILE, SHARDS_DIR, STORE_DIR
from .fingerprints import config_hash
from .records import BuildRecord, IndexRecord
from .stored import state_from_array, state_to_array

__all__ = [
    "AttributionError", "BUILD_FILE", "BuildRecord", "CONFIG_FILE", "FORMAT_VERSION",
    "IndexConfig", "IndexRecord", "MASK_FILE",
    "SHARDS_DIR", "STORE_DIR", "config_hash", "describe_index", "read_config", "read_record",
    "state_from_array", "state_to_array",
]
