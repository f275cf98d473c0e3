"""The one base class of every error grass-index raises on bad input or a broken index.

Each stage keeps its own error type (StoreError, CaptureError, FaissIndexError, TaskError,
AttributionError, ...) so a caller can tell them apart; all of them also derive from
GrassIndexError, so a caller (the CLI, a service) that only wants "our error: show the message,
which names the problem and the fix" catches this one class. Errors that were ValueError or
RuntimeError subclasses stay so, for callers that catch those.
"""
from __future__ import annotations


class GrassIndexError(Exception):
    """Bad input or a broken index directory; the message names the problem and the fix."""


__all__ = ["GrassIndexError"]
