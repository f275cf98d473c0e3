"""LMDB sketch store: crash-safe, resumable storage of sketch rows, arrays and build state."""
from .errors import StoreError, WriterLockedError
from .sketch_store import SketchStore, writer_lock

__all__ = ["SketchStore", "StoreError", "WriterLockedError", "writer_lock"]
