"""What an index directory is made of: its file names (the layout is described in
docs/design.md and in this package's __init__)."""
from __future__ import annotations

import re

from ..fileio import atomic_write, jsonable, write_json  # noqa: F401  (re-exported for the stages here)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
BUILD_FILE = "build.json"
STORE_DIR = "sketches"
SHARDS_DIR = "shards"  # `build --worker i/n`: one sketch store per worker, shards/i-of-n/
ADDS_DIR = "adds"  # `add --worker i/n` (a living index grown by workers): adds/i-of-n/
MASK_FILE = "selective_mask.pt"  # copy of the selective-mask file, so queries need only the dir
OUR_FILES = {CONFIG_FILE, BUILD_FILE, STORE_DIR, SHARDS_DIR, ADDS_DIR}
# The FAISS files pass 2 writes (and `query --normalize cosine`'s second index): the only
# names an index directory's clean-up deletes (fileio.unlink_owned).
INDEX_FILE = re.compile(r"index-[0-9a-f]+(-\d+-of-\d+|-cosine)?\.faiss")


def index_file_names(key: str, parts: int) -> list[str]:
    """The FAISS file(s) of the pass-2 variant ``key``: one file, or one per part."""
    return ([f"index-{key}.faiss"] if parts == 1 else
            [f"index-{key}-{i}-of-{parts}.faiss" for i in range(parts)])


def cosine_file_name(key: str) -> str:
    """The exact index of unit-norm vectors that cosine search uses (grass_index.analysis.
    normalize), built on first use beside the main index of the same variant ``key``."""
    return f"index-{key}-cosine.faiss"


def saturated_name(key: str) -> str:
    """The store array of variant ``key``'s saturated (row, layer) blocks, for an index that
    takes its rows raw (index/store_scan.py): under the preconditioner's prefix, so it is
    kept and cleaned up with it."""
    return f"precond/{key}/saturated"
