"""Index file container: the FAISS serialisation followed by JSON metadata and a fixed footer.

The FAISS bytes come first so ``faiss.read_index`` (and its mmap modes) can read the file as is;
the footer's lengths and CRC32 turn a truncated or corrupted file into a clear error instead of
a FAISS crash or a silently wrong index. Writes go through ``fileio.atomic_path`` (temp file,
fsync, rename, directory fsync), so a reader sees the old file or the new one, never a torn one;
reads open only a regular file, never through a symlink (``fileio.open_regular``).
"""
from __future__ import annotations

import json
import os
import struct
import zlib

import faiss

from ..errors import GrassIndexError
from ..fileio import FileWriteError, atomic_path, check_regular, open_regular

MAGIC = b"GIDX0001"
_FOOTER = struct.Struct("<8sQQI4x")  # magic, faiss_len, meta_len, crc32(faiss+meta)
_READ = 16 << 20


class FaissIndexError(GrassIndexError, RuntimeError):
    """A FAISS index cannot be built, searched, saved or loaded; the message says what to do."""


def write(path: str, index, meta: dict) -> None:
    """FAISS bytes, metadata and footer, written atomically (fileio.atomic_path)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FaissIndexError(f"cannot save the index to {path}: directory {directory} does not exist")
    try:
        with atomic_path(path) as tmp:
            faiss.write_index(index, tmp)
            meta_b = json.dumps(meta, sort_keys=True).encode()
            with open(tmp, "r+b") as f:
                crc, n = 0, 0
                while chunk := f.read(_READ):
                    crc, n = zlib.crc32(chunk, crc), n + len(chunk)
                crc = zlib.crc32(meta_b, crc)
                f.write(meta_b)
                f.write(_FOOTER.pack(MAGIC, n, len(meta_b), crc))
    except (FileWriteError, RuntimeError) as e:
        why = e.strerror if isinstance(e, FileWriteError) else e
        raise FaissIndexError(f"saving the index to {path} failed ({why}); any previous file "
                              "there is unchanged.") from e


def read_meta(path: str, *, verify: bool = True) -> dict:
    """Validate the container (lengths, magic, optionally CRC) and return its metadata."""
    path = os.fspath(path)
    if not check_regular(path):
        raise FaissIndexError(f"no index file at {path}; build the index first (or check the path)")
    size = os.path.getsize(path)
    bad = (f"{path} is not a complete grass-index FAISS file (truncated, corrupted, or written by "
           "something else); rebuild it from the sketch store")
    if size < _FOOTER.size:
        raise FaissIndexError(bad + f" [only {size} bytes]")
    with open_regular(path) as f:
        f.seek(size - _FOOTER.size)
        magic, n, m, crc = _FOOTER.unpack(f.read(_FOOTER.size))
        if magic != MAGIC or n + m + _FOOTER.size != size:
            raise FaissIndexError(bad + " [footer missing or lengths disagree with the file size]")
        f.seek(0)
        if verify:
            got, left = 0, n
            while left:
                chunk = f.read(min(_READ, left))
                got, left = zlib.crc32(chunk, got), left - len(chunk)
        else:
            f.seek(n)
        meta_b = f.read(m)
        if verify and zlib.crc32(meta_b, got) != crc:
            raise FaissIndexError(bad + " [checksum mismatch]")
    try:
        return json.loads(meta_b)
    except ValueError:
        raise FaissIndexError(bad + " [metadata is not valid JSON]") from None
