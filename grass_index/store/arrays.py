"""Named ndarrays (preconditioners, Fisher sums) stored as checksummed chunks or files.

Small arrays are chunks in LMDB, written in their own transactions under a fresh random
generation tag; one final transaction switches the header to the new generation and drops the
old chunks. Arrays of ``FILE_BYTES`` or more (a 4096² float64 Fisher block is 134 MB) go to a
``.npy`` file in ``arrays/`` beside the LMDB data instead — LMDB values that large cost a copy
in the map and another on every read — written to a temp name, fsynced and renamed to the
generation's name before the same header switch. Either way readers see the old array or the
new one, never a mix; chunks and files orphaned by a crash are removed the next time a writer
opens the store.

A header's ``file`` is data read from the store: at every use it must be a name this module
writes (``ARRAY_FILE``) in ``arrays/``, a real directory, and the file a regular one; clean-up
deletes only such files (``fileio.unlink_owned``), never through a symlink.
"""
from __future__ import annotations

import json
import os
import re
import struct

import numpy as np

from ..errors import GrassIndexError
from ..fileio import TEMP_NAME, atomic_save, check_dir, check_regular, unlink_owned
from .codec import crc32, crc32_update
from .errors import StoreError

CHUNK_BYTES = 64 << 20
FILE_BYTES = 16 << 20  # arrays at least this large are .npy files, not LMDB values
FILE_DIR = "arrays"
ARRAY_FILE = re.compile(r"[0-9a-f]{16}\.npy")  # arrays/<generation>.npy
_OLD_TEMP = re.compile(r"[0-9a-f]+\.npy\.tmp")  # the temp name earlier versions wrote
_GEN_IDX = struct.Struct(">QQ")


def _name_key(name: str) -> bytes:
    if not isinstance(name, str) or not name or "\0" in name:
        raise StoreError(f"array name must be a non-empty string without NUL bytes, got {name!r}")
    return name.encode()


def _chunk_key(name_b: bytes, gen: int, i: int) -> bytes:
    return name_b + b"\0" + _GEN_IDX.pack(gen, i)


def _as_bytes(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def put_array(h, name: str, arr, *, state) -> None:
    name_b = _name_key(name)
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biufc":
        raise StoreError(f"array {name!r} has dtype {arr.dtype}; only numeric arrays can be stored "
                         "(convert it, e.g. with .astype(np.float64)).")
    flat = _as_bytes(arr)
    gen = int.from_bytes(os.urandom(8), "big")
    if flat.nbytes >= FILE_BYTES:
        return _put_file(h, name_b, arr, gen, state=state)
    crcs = []
    for i, lo in enumerate(range(0, flat.nbytes, CHUNK_BYTES)):
        part = flat[lo: lo + CHUNK_BYTES]
        crcs.append(crc32(part))
        h.write(lambda txn, k=_chunk_key(name_b, gen, i), v=part:
                txn.put(k, v, db=h.dbs["chunks"]), state=state, need_bytes=part.nbytes)
    header = {"dtype": arr.dtype.str, "shape": list(arr.shape), "nbytes": int(flat.nbytes),
              "gen": gen, "chunk": CHUNK_BYTES, "crcs": crcs}

    _switch(h, name_b, header, state=state)


def _switch(h, name_b: bytes, header: dict, *, state) -> None:
    """Point ``name`` at its new generation and drop the old one (chunks in the same
    transaction; an old file right after it commits)."""
    def switch(txn):
        old = txn.get(name_b, db=h.dbs["arrays"])
        txn.put(name_b, json.dumps(header).encode(), db=h.dbs["arrays"])
        if old is None:
            return None
        old = json.loads(bytes(old))
        _delete_chunks(txn, h, name_b, old)
        return old

    _unlink_file(h, h.write(switch, state=state))


def _file_dir(h) -> str:
    fdir = os.path.join(h.path, FILE_DIR)
    try:
        check_dir(fdir)
    except GrassIndexError as e:
        raise StoreError(str(e)) from None
    return fdir


def _file_path(h, fname) -> str:
    """``arrays/<fname>``, refused unless ``fname`` (read from a header) is a name this module
    writes: an absolute or ``../`` name can never reach outside the store."""
    if not isinstance(fname, str) or not ARRAY_FILE.fullmatch(fname):
        raise StoreError(f"an array header in {h.path} names the file {str(fname)[:200]!r}, "
                         "which is not an array file of this store (arrays/<hex>.npy); the store "
                         "was edited or damaged: re-run the step that wrote it (or rebuild)")
    return os.path.join(_file_dir(h), fname)


def _put_file(h, name_b: bytes, arr: np.ndarray, gen: int, *, state) -> None:
    """Write ``arr`` as ``arrays/<gen>.npy`` (temp name, fsync, rename), then switch to it."""
    os.makedirs(os.path.join(h.path, FILE_DIR), exist_ok=True)
    fname = f"{gen:016x}.npy"
    arr = np.ascontiguousarray(arr)
    flat = _as_bytes(arr)
    crcs = []

    def write(f):
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
        crc = 0
        for lo in range(0, flat.nbytes, CHUNK_BYTES):
            part = flat[lo: lo + CHUNK_BYTES]
            crc = crc32_update(part, crc)
            f.write(part)
        crcs.append(crc)

    atomic_save(_file_path(h, fname), write)
    crc = crcs[0]
    header = {"dtype": arr.dtype.str, "shape": list(arr.shape), "nbytes": int(flat.nbytes),
              "gen": gen, "file": fname, "crc": crc, "crcs": []}
    _switch(h, name_b, header, state=state)


def _unlink_file(h, header) -> None:
    """Delete a replaced header's file, only if it is one of ours (a forged name is left)."""
    if header and header.get("file"):
        unlink_owned(os.path.join(h.path, FILE_DIR), header["file"], ARRAY_FILE)


def _read_file(h, name: str, header: dict) -> np.ndarray:
    path = _file_path(h, header["file"])
    try:
        if not check_regular(path):
            raise FileNotFoundError("no such file")
        out = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreError(f"array {name!r} file {path} is missing or unreadable ({e}); re-run the "
                         "step that wrote it (or rebuild the store).") from None
    flat = _as_bytes(out)
    crc = 0
    for lo in range(0, flat.nbytes, CHUNK_BYTES):
        crc = crc32_update(flat[lo: lo + CHUNK_BYTES], crc)
    if (out.dtype.str != header["dtype"] or list(out.shape) != header["shape"]
            or crc != header["crc"]):
        raise StoreError(f"array {name!r} file {path} is corrupted (checksum mismatch); re-run "
                         "the step that wrote it (or rebuild the store).")
    return out


def _map_file(h, name: str, header: dict) -> np.ndarray:
    """A file array memory-mapped read-only, checked cheaply against its header (the .npy
    header parses, dtype and shape match, the file holds exactly header + data): pages are
    read as they are used and nothing is checksummed. A truncated or swapped file is caught
    here; a flipped byte inside the data is `verify`'s to find (the full CRC)."""
    path = _file_path(h, header["file"])
    try:
        out = np.load(path, mmap_mode="r", allow_pickle=False)
        size = os.path.getsize(path)
    except (OSError, ValueError) as e:
        raise StoreError(f"array {name!r} file {path} is missing or unreadable ({e}); re-run the "
                         "step that wrote it (or rebuild the store).") from None
    if (not isinstance(out, np.memmap) or out.dtype.str != header["dtype"]
            or list(out.shape) != header["shape"]
            or size != out.offset + int(header["nbytes"])):
        raise StoreError(f"array {name!r} file {path} does not match its record (dtype, shape "
                         "or size); re-run the step that wrote it (or rebuild the store).")
    return out


def delete_array(h, name: str, *, state) -> bool:
    """Drop a named array (header and chunks) in one transaction; False if it did not exist."""
    name_b = _name_key(name)

    def drop(txn):
        old = txn.get(name_b, db=h.dbs["arrays"])
        if old is None:
            return None
        txn.delete(name_b, db=h.dbs["arrays"])
        old = json.loads(bytes(old))
        _delete_chunks(txn, h, name_b, old)
        return old

    old = h.write(drop, state=state)
    _unlink_file(h, old)
    return old is not None


def _delete_chunks(txn, h, name_b: bytes, header: dict) -> None:
    for i in range(len(header["crcs"])):
        txn.delete(_chunk_key(name_b, header["gen"], i), db=h.dbs["chunks"])


def read_header(txn, h, name: str):
    raw = txn.get(_name_key(name), db=h.dbs["arrays"])
    return None if raw is None else json.loads(bytes(raw))


def get_array(h, name: str, *, mapped: bool = False) -> np.ndarray:
    name_b = _name_key(name)

    def read(txn):
        header = read_header(txn, h, name)
        if header is None:
            raise KeyError(f"the store has no array named {name!r} (has: {array_names_txn(txn, h)})")
        if header.get("file"):
            return header
        out = np.empty(header["nbytes"], dtype=np.uint8)
        step = header["chunk"]
        for i, want in enumerate(header["crcs"]):
            buf = txn.get(_chunk_key(name_b, header["gen"], i), db=h.dbs["chunks"])
            lo = i * step
            if buf is None or len(buf) != min(step, header["nbytes"] - lo) or crc32(buf) != want:
                raise StoreError(f"array {name!r} chunk {i} is missing or corrupted (checksum "
                                 "mismatch); re-run the step that wrote it (or rebuild the store).")
            out[lo: lo + len(buf)] = np.frombuffer(buf, dtype=np.uint8)
        return out.view(np.dtype(header["dtype"])).reshape(header["shape"])

    got = h.read(read)
    if not isinstance(got, dict):
        return got
    return _map_file(h, name, got) if mapped else _read_file(h, name, got)


def array_names_txn(txn, h) -> list[str]:
    return [bytes(k).decode() for k in txn.cursor(db=h.dbs["arrays"]).iternext(values=False)]


def file_problems(h) -> list[str]:
    """Headers naming a file that is not one of this store's array files (cheap: no reads)."""
    def scan(txn):
        out = []
        for k, v in txn.cursor(db=h.dbs["arrays"]).iternext():
            header = json.loads(bytes(v))
            fname = header.get("file") if isinstance(header, dict) else None
            if fname is not None and not (isinstance(fname, str)
                                          and ARRAY_FILE.fullmatch(fname)):
                out.append(f"array {bytes(k).decode()!r} names the file {str(fname)[:200]!r}, "
                           "which is not an array file of this store (arrays/<hex>.npy)")
        return out
    return h.read(scan)


def collect_orphans(h, *, state) -> int:
    """Delete chunks and files no header points to (left by an interrupted put_array)."""
    files = set()

    def gc(txn):
        live = {}
        for k, v in txn.cursor(db=h.dbs["arrays"]).iternext():
            header = json.loads(bytes(v))
            live[bytes(k)] = header["gen"]
            if header.get("file"):
                files.add(header["file"])
        dead = []
        for k in txn.cursor(db=h.dbs["chunks"]).iternext(values=False):
            k = bytes(k)
            name_b, tail = k[:-17], k[-16:]
            gen, _ = _GEN_IDX.unpack(tail)
            if live.get(name_b) != gen:
                dead.append(k)
        for k in dead:
            txn.delete(k, db=h.dbs["chunks"])
        return len(dead)

    n = h.write(gc, state=state)
    fdir = os.path.join(h.path, FILE_DIR)
    if not check_dir(fdir):  # a symlink or file here is refused, never listed
        return n
    for fname in os.listdir(fdir):
        if fname not in files:
            n += any(unlink_owned(fdir, fname, owned) for owned in (ARRAY_FILE, TEMP_NAME,
                                                                    _OLD_TEMP))
    return n
