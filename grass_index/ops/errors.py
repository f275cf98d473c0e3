"""The error type of the custom ops' input checks (same messages with or without native code)."""
from __future__ import annotations

from ..errors import GrassIndexError


class OpInputError(GrassIndexError, ValueError):
    """Bad input to torch.ops.grass_index.sjlt / mask: wrong dtype, shape or index range."""
