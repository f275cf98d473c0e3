"""Fitting a Selective Mask: learn which gradient coordinates to keep per layer, so that
masked-gradient attribution scores match the full ones (`grass-index selective-mask fit`).

A stage above capture/ and precondition/ (it needs per-sample gradients and the damping the
index will use); the mask file it produces is read by compress/ (``selective_mask-…`` specs).
"""
from .errors import MaskFitError
from .fit import MaskFitOptions, fit_selective_mask

__all__ = ["MaskFitError", "MaskFitOptions", "fit_selective_mask"]
