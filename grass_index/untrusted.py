"""Handling strings read from an index directory, which is data anyone may have edited.

Two rules: a file name taken from a config is a plain name inside the directory (never a path
that could point elsewhere), and a recorded string is shown with its control characters made
visible, so it cannot move the cursor, recolour or rewrite the terminal (ANSI escapes).
"""
from __future__ import annotations

import re

from .errors import GrassIndexError, repair_command

# Names the pipeline writes (index-<key>.faiss, index-<key>-i-of-n.faiss, selective_mask.pt):
# letters, digits, '.', '_', '-', not starting with '.'.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class UnsafeNameError(GrassIndexError, ValueError):
    """A file name read from an index (a config, an array header) that is not a plain name
    inside the directory; checked at every use, not only when the record is read."""


def plain_file_name(name, what: str) -> str:
    """``name`` if it is a plain file name (no '/', no '..', no leading '.'), else refuse."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise UnsafeNameError(f"{what} {safe_text(repr(name))} is not a plain file name inside "
                              "the index directory (names are letters, digits, '.', '_', '-'; "
                              "no '/' or '..'); the config was edited or damaged — run "
                              f"{repair_command()} to restore it from the store")
    return name


def safe_text(s) -> str:
    """``str(s)`` with control characters (ESC, CR, bidi overrides, ...) shown as \\xNN escapes;
    newlines and tabs are kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", str(s))
