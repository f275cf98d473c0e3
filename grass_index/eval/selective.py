"""Moved: Selective-Mask fitting lives in grass_index.maskfit (kept importable from here)."""
from ..maskfit import MaskFitError, fit_selective_mask  # noqa: F401
