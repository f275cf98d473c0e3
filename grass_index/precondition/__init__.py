"""Preconditioning in sketch space: per-layer empirical Fisher (FisherAccumulator) and its
damped inverse (Preconditioner, eFIM or identity)."""
from .damping import DEFAULT_DAMPING, format_damping, parse_damping
from .errors import PreconditionError
from .fisher import FisherAccumulator
from .preconditioner import HESSIANS, Preconditioner, canonical_hessian, unrepresentable_rows

__all__ = ["DEFAULT_DAMPING", "FisherAccumulator", "HESSIANS", "Preconditioner",
           "PreconditionError", "canonical_hessian", "format_damping", "parse_damping",
           "unrepresentable_rows"]
