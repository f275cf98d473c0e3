"""FAISS inner-product index over preconditioned sketches: build, persist, search."""
from ._file import FaissIndexError
from .recall import recall_at_k
from .threads import configure_threads
from .vector_index import VectorIndex

IndexError_ = FaissIndexError  # the name used in the contract draft

__all__ = ["VectorIndex", "FaissIndexError", "IndexError_", "recall_at_k", "configure_threads"]
