"""FAISS inner-product index over preconditioned sketches: build, persist, search.

FAISS comes from the [cpu] or [gpu] extra (_faiss.py): without either, importing this stage
raises FaissNotInstalledError, one line naming both."""
from ._faiss import FaissNotInstalledError  # first: before any module imports faiss
from ._file import FaissIndexError
from .recall import ExactTopK, recall_at_k
from .threads import configure_threads
from .sharded import ShardedIndex, part_ranges
from .vector_index import SPECS, IndexSpec, VectorIndex, check_serves, parse_spec
from .search_sketch import SearchSketch, SketchedIndex

IndexError_ = FaissIndexError  # older spelling of FaissIndexError, kept importable

__all__ = ["VectorIndex", "FaissIndexError", "FaissNotInstalledError", "IndexError_", "recall_at_k", "ExactTopK",
           "configure_threads", "parse_spec", "IndexSpec", "SPECS", "ShardedIndex", "part_ranges",
           "check_serves", "SearchSketch", "SketchedIndex"]
