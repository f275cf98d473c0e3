"""Preconditioning in sketch space: per-layer empirical Fisher (FisherAccumulator, ChunkedFisher)
or Kronecker factors (KroneckerFactors, for EK-FAC) and the damped inverse (Preconditioner:
eFIM, EK-FAC or identity), stored per layer (persist)."""
from .damping import DEFAULT_DAMPING, format_damping, parse_damping
from .ekfac import (KroneckerFactors, corrected_eigenvalues, ekfac_unsupported, load_factors,
                    save_factors)
from .errors import DampingError, PreconditionError
from .fisher import ChunkedFisher, FisherAccumulator
from .persist import (has_preconditioner, load_preconditioner, save_preconditioner,
                      stale_preconditioner_arrays)
from .preconditioner import (HESSIANS, Preconditioner, canonical_hessian, dense_layers,
                             guard_precision, unrepresentable_rows,
                             zero_saturated_blocks, uses_low_rank)

__all__ = ["DEFAULT_DAMPING", "ChunkedFisher", "KroneckerFactors", "corrected_eigenvalues",
           "ekfac_unsupported", "load_factors", "save_factors", "FisherAccumulator", "HESSIANS", "Preconditioner",
           "DampingError", "PreconditionError", "canonical_hessian", "dense_layers", "guard_precision", "zero_saturated_blocks", "format_damping",
           "has_preconditioner", "load_preconditioner", "parse_damping", "save_preconditioner",
           "stale_preconditioner_arrays", "unrepresentable_rows", "uses_low_rank"]
