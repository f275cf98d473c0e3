"""The error type of mask fitting."""
from __future__ import annotations

from ..errors import GrassIndexError


class MaskFitError(GrassIndexError, ValueError):
    """A Selective Mask cannot be fitted; the message names the problem and the fix."""
