"""FAISS inner-product index over preconditioned sketches: build, persist, search."""
from ._file import FaissIndexError
from .recall import ExactTopK, recall_at_k
from .threads import configure_threads
from .vector_index import SPECS, VectorIndex, parse_spec, spec_of

IndexError_ = FaissIndexError  # the name used in the contract draft

__all__ = ["VectorIndex", "FaissIndexError", "IndexError_", "recall_at_k", "ExactTopK",
           "configure_threads", "parse_spec", "spec_of", "SPECS"]
