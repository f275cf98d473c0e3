"""Byte layouts: big-endian integer keys (byte order = numeric order) and checksummed blocks.

A block value is a 32-byte header followed by the rows as C-order float32. The header carries a
CRC32 of the rows so silent corruption is reported instead of returned.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from ..errors import spelled
from .errors import StoreError

_U64 = struct.Struct(">Q")
BLOCK_MAGIC = b"GSB1"
_HEADER = struct.Struct("<4sIQII")  # magic, crc32(rows), start_id, nrows, dim
HEADER_SIZE = 32  # header padded so the rows start 32-byte aligned


def key(i: int) -> bytes:
    return _U64.pack(i)


def unkey(b) -> int:
    return _U64.unpack(bytes(b))[0]


def encode_block(start_id: int, rows: np.ndarray) -> bytearray:
    payload = memoryview(rows).cast("B")
    head = _HEADER.pack(BLOCK_MAGIC, zlib.crc32(payload), start_id, rows.shape[0], rows.shape[1])
    out = bytearray(HEADER_SIZE + len(payload))
    out[: len(head)] = head
    out[HEADER_SIZE:] = payload
    return out


def decode_block(buf, *, where: str, verify: bool = True) -> tuple[int, np.ndarray]:
    """Return (start_id, rows view over buf); copy the rows before buf's transaction ends."""
    if len(buf) < HEADER_SIZE:
        raise StoreError(f"{where} is truncated ({len(buf)} bytes); the store is corrupted — "
                         "rebuild it (or resume from an earlier block).")
    magic, crc, start, n, dim = _HEADER.unpack_from(buf, 0)
    if magic != BLOCK_MAGIC or len(buf) != HEADER_SIZE + 4 * n * dim:
        raise StoreError(f"{where} has a bad header or length; the store is corrupted — rebuild it.")
    body = memoryview(buf)[HEADER_SIZE:]
    if verify and zlib.crc32(body) != crc:
        fix = spelled("`grass-index verify DIR --repair --task TASK`",
                      "verify_index(DIR, repair=True, task=TASK)")
        raise StoreError(f"{where} failed its checksum (data corrupted on disk); recompute it "
                         f"with {fix} or by re-running the build.")
    return start, np.frombuffer(body, dtype=np.float32).reshape(n, dim)


def crc32(buf) -> int:
    return zlib.crc32(buf)


def crc32_update(buf, crc: int) -> int:
    """Running CRC32 (``crc`` from the previous part), for arrays written in parts."""
    return zlib.crc32(buf, crc)
