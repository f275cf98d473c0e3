"""The error type of the attribution pipeline."""
from __future__ import annotations

from ..errors import GrassIndexError


class AttributionError(GrassIndexError, ValueError):
    """Bad input or a broken index directory; the message names the problem and the fix."""


# Raised here, reported as grass_index.attribute.AttributionError (the public name).
AttributionError.__module__ = "grass_index.attribute"
