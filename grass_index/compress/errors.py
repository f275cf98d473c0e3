"""The error type of the compressors: a bad spec, a spec that does not fit a layer, a bad mask
file. A ValueError (what callers caught before it existed) and a GrassIndexError."""
from __future__ import annotations

from ..errors import GrassIndexError


class CompressError(GrassIndexError, ValueError):
    """A compression spec or mask is unusable; the message says what is wrong and the fix."""


SpecError = CompressError  # the name for spec-language errors (parse_spec)
