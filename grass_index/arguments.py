"""The Python API's arguments checked where they enter: a wrong type is one GrassIndexError
naming the function, the argument and what to pass (never a raw TypeError or AttributeError
from deep inside). ``ArgumentError`` is also a TypeError, for callers that catch that."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import GrassIndexError


class ArgumentError(GrassIndexError, TypeError):
    """An argument of the wrong type; the message names the function, the argument and a fix."""


def directory(path, fn: str, arg: str = "path") -> Path:
    """``path`` as a Path, when it is a str or os.PathLike (an index directory's name)."""
    if isinstance(path, (str, os.PathLike)) and str(path):
        return Path(path)
    raise ArgumentError(f"{fn}: {arg} must be a directory name (str or pathlib.Path), got "
                        f"{_shown(path)}; e.g. {fn}(..., {arg}='runs/my-index')"
                        if arg != "path" else
                        f"{fn}: path must be an index directory (str or pathlib.Path), got "
                        f"{_shown(path)}; e.g. {fn}('runs/my-index')")


def options(value, cls: type, fn: str, arg: str):
    """``value`` if it is a ``cls`` (None: the defaults, ``cls()``)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    raise ArgumentError(f"{fn}: {arg} must be a grass_index.{cls.__name__} (or None for the "
                        f"defaults), got {_shown(value)}; e.g. {arg}=grass_index."
                        f"{cls.__name__}(...)")


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}" \
        if value is not None else "None"
