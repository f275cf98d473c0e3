"""The query side: checking a model against an index, sketching queries, opening the store,
FAISS and the preconditioner, searching (querying.py); example files for query/score
(inputs.py)."""
from .inputs import InputError, load_examples

__all__ = ["InputError", "load_examples"]
