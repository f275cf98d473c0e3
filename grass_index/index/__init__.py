"""FAISS inner-product index over preconditioned sketches: build, persist, search."""
from ._file import FaissIndexError
from .recall import ExactTopK, recall_at_k
from .threads import configure_threads
from .sharded import ShardedIndex, part_ranges
from .vector_index import SPECS, IndexSpec, VectorIndex, check_serves, parse_spec
from .search_sketch import SearchSketch, SketchedIndex

IndexError_ = FaissIndexError  # older spelling of FaissIndexError, kept importable

__all__ = ["VectorIndex", "FaissIndexError", "IndexError_", "recall_at_k", "ExactTopK",
           "configure_threads", "parse_spec", "IndexSpec", "SPECS", "ShardedIndex", "part_ranges",
           "check_serves", "SearchSketch", "SketchedIndex"]
