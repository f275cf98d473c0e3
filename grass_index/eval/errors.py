"""The error type of evaluation (LDS, ground truth, subsets)."""
from __future__ import annotations

from ..errors import GrassIndexError


class EvalError(GrassIndexError, ValueError):
    """LDS evaluation cannot run; the message names the problem and the fix."""
