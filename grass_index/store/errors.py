"""Store exceptions: one base class so callers can catch every store problem at once."""
from __future__ import annotations

from ..errors import GrassIndexError


class StoreError(GrassIndexError, RuntimeError):
    """A sketch store cannot be opened, read or written; the message says why and what to do."""


class WriterLockedError(StoreError):
    """Another writer holds the store's lock (only one build may write a store at a time)."""
