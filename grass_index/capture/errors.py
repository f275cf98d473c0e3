"""The one exception type capture raises, so callers (pipeline, CLI) can report it cleanly."""
from __future__ import annotations

from ..errors import GrassIndexError


class CaptureError(GrassIndexError, ValueError):
    """Bad input to gradient capture: wrong loss shape, unknown layer pattern, NaN/inf gradient.

    ``example`` (index within the batch) and ``layer`` are set when the error concerns one
    example's gradient, so the pipeline can translate the index into a training id.
    """

    def __init__(self, message: str, *, example: int | None = None, layer: str | None = None):
        super().__init__(message)
        self.example = example
        self.layer = layer
