"""Named ndarrays (preconditioners, Fisher sums) stored as checksummed chunks.

Chunks are written in their own transactions (bounded memory for GB-sized arrays) under a fresh
random generation tag; one final transaction switches the header to the new generation and drops
the old chunks. Readers therefore see the old array or the new one, never a mix; chunks orphaned
by a crash are removed the next time a writer opens the store.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from .codec import crc32
from .errors import StoreError

CHUNK_BYTES = 64 << 20
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
    crcs = []
    for i, lo in enumerate(range(0, flat.nbytes, CHUNK_BYTES)):
        part = flat[lo: lo + CHUNK_BYTES]
        crcs.append(crc32(part))
        h.write(lambda txn, k=_chunk_key(name_b, gen, i), v=part:
                txn.put(k, v, db=h.dbs["chunks"]), state=state, need_bytes=part.nbytes)
    header = {"dtype": arr.dtype.str, "shape": list(arr.shape), "nbytes": int(flat.nbytes),
              "gen": gen, "chunk": CHUNK_BYTES, "crcs": crcs}

    def switch(txn):
        old = txn.get(name_b, db=h.dbs["arrays"])
        txn.put(name_b, json.dumps(header).encode(), db=h.dbs["arrays"])
        if old is not None:
            _delete_chunks(txn, h, name_b, json.loads(bytes(old)))

    h.write(switch, state=state)


def delete_array(h, name: str, *, state) -> bool:
    """Drop a named array (header and chunks) in one transaction; False if it did not exist."""
    name_b = _name_key(name)

    def drop(txn):
        old = txn.get(name_b, db=h.dbs["arrays"])
        if old is None:
            return False
        txn.delete(name_b, db=h.dbs["arrays"])
        _delete_chunks(txn, h, name_b, json.loads(bytes(old)))
        return True

    return h.write(drop, state=state)


def _delete_chunks(txn, h, name_b: bytes, header: dict) -> None:
    for i in range(len(header["crcs"])):
        txn.delete(_chunk_key(name_b, header["gen"], i), db=h.dbs["chunks"])


def read_header(txn, h, name: str):
    raw = txn.get(_name_key(name), db=h.dbs["arrays"])
    return None if raw is None else json.loads(bytes(raw))


def get_array(h, name: str) -> np.ndarray:
    name_b = _name_key(name)

    def read(txn):
        header = read_header(txn, h, name)
        if header is None:
            raise KeyError(f"the store has no array named {name!r} (has: {array_names_txn(txn, h)})")
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

    return h.read(read)


def array_names_txn(txn, h) -> list[str]:
    return [bytes(k).decode() for k in txn.cursor(db=h.dbs["arrays"]).iternext(values=False)]


def collect_orphans(h, *, state) -> int:
    """Delete chunks no header points to (left by a put_array that was interrupted)."""
    def gc(txn):
        live = {}
        for k, v in txn.cursor(db=h.dbs["arrays"]).iternext():
            live[bytes(k)] = json.loads(bytes(v))["gen"]
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

    return h.write(gc, state=state)
