"""Preconditioning in sketch space: per-layer empirical Fisher (FisherAccumulator, ChunkedFisher)
and its damped inverse (Preconditioner, eFIM or identity), stored per layer (persist)."""
from .damping import DEFAULT_DAMPING, format_damping, parse_damping
from .errors import PreconditionError
from .fisher import ChunkedFisher, FisherAccumulator
from .persist import (has_preconditioner, load_preconditioner, save_preconditioner,
                      stale_preconditioner_arrays)
from .preconditioner import (HESSIANS, Preconditioner, canonical_hessian, dense_layers,
                             unrepresentable_rows, uses_low_rank)

__all__ = ["DEFAULT_DAMPING", "ChunkedFisher", "FisherAccumulator", "HESSIANS", "Preconditioner",
           "PreconditionError", "canonical_hessian", "dense_layers", "format_damping",
           "has_preconditioner", "load_preconditioner", "parse_damping", "save_preconditioner",
           "stale_preconditioner_arrays", "unrepresentable_rows", "uses_low_rank"]
