"""SketchStore: the LMDB store of raw sketches, preconditioners and build state.

Rows are stored in blocks (one LMDB value per batch of rows) because single large rows waste up
to half of every page: a value over ~2 KB takes whole 4 KiB overflow pages, so one 512-d float32
row per value measured 2x its size on disk (lmdb 3.0.0); one block per batch amortises the
last page over many rows. Each block is committed in the same transaction as the
progress counter, so after any crash the store holds exactly blocks 0..committed_blocks-1 and a
resumed build continues from there.
"""
from __future__ import annotations

import json
import os
import struct
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import GrassIndexError
from ..fileio import check_tree
from . import _env, arrays, codec
from .errors import StoreError, WriterLockedError
from .lock import LOCK_NAME, WriterLock

FORMAT = 1
_PROGRESS = struct.Struct("<QQ")  # committed_blocks, num_rows
_READ_BATCH_BYTES = 32 << 20  # rows copied per read transaction in iter_blocks
_MISSING = object()


def _checked_json(value, what: str):
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} must be JSON-serialisable (plain dict/list/str/number/bool/None, "
                         f"no NaN): {e}") from e


def _meta_diff(old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if a != b:
            show = lambda v: "<absent>" if v is _MISSING else repr(v)[:200]  # noqa: E731
            out.append(f"{k}: stored {show(a)}, requested {show(b)}")
    return out


def _int(value, what: str) -> int:
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise StoreError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


class SketchStore:
    """See module docstring. Create with :meth:`create` (writer) or :meth:`open`."""

    def __init__(self, path: str, handle, lock: WriterLock | None, readonly: bool, config: dict):
        self.path = path
        self._h = handle
        self._lock = lock
        self.readonly = readonly
        self._config = config

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, *, dim: int, meta: dict, lock: WriterLock | None = None
               ) -> "SketchStore":
        """Create a store, or reopen an existing one for resuming if its dim and meta match.

        ``lock``: this store's writer lock, already acquired by the caller (see
        :func:`writer_lock`) so it can claim the directory before the store exists; the
        store then owns it and releases it on close."""
        path = os.fspath(path)
        dim = _int(dim, "dim")
        if dim == 0:
            raise StoreError("dim must be positive (the total sketch width K)")
        if not isinstance(meta, dict):
            raise StoreError(f"meta must be a dict, got {type(meta).__name__}")
        meta = _checked_json(meta, "meta")
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f"{path} exists and is not a directory; a store is a directory.")
        os.makedirs(path, exist_ok=True)
        if lock is None:
            lock = WriterLock(path)
            lock.acquire()
        elif not lock.held or os.path.realpath(lock.path) != os.path.realpath(
                os.path.join(path, LOCK_NAME)):
            raise StoreError(f"the lock passed to create({path!r}) is not this store's held lock")
        h = None
        try:
            h = _env.acquire(path, readonly=False, create=True)
            config = h.read(lambda txn: _read_config(txn, h))
            if config is None:
                config = {"format": FORMAT, "dim": dim, "meta": meta, "created": time.time(),
                          "lmdb_engine": list(_engine(h))}
                h.write(lambda txn: _init(txn, h, config), state=lambda: "empty")
            else:
                _check_format(config, path)
                diff = ([f"dim: stored {config['dim']}, requested {dim}"] if config["dim"] != dim
                        else []) + _meta_diff(config["meta"], meta)
                if diff:
                    raise StoreError(
                        f"the store at {path} was built with a different configuration:\n  "
                        + "\n  ".join(diff) + "\nUse another output directory, or delete this one "
                        "to rebuild from scratch.")
            store = cls(path, h, lock, False, config)
            arrays.collect_orphans(h, state=store._state)
            return store
        except BaseException:
            if h is not None:
                _env.release(h)
            lock.release()
            raise

    @classmethod
    def open(cls, path, *, readonly: bool = True) -> "SketchStore":
        """Open an existing store. Read-only opens never block (nor are blocked by) a writer."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise StoreError(f"no sketch store at {path} (directory does not exist); build one "
                             "first, or check the path.")
        if not os.path.exists(os.path.join(path, _env.DATA_FILE)):
            raise StoreError(f"no sketch store at {path} (no {_env.DATA_FILE} inside); build one "
                             "first, or check the path.")
        lock = None
        if not readonly:
            lock = WriterLock(path)
            lock.acquire()
        h = None
        try:
            h = _env.acquire(path, readonly=readonly, create=False)
            config = h.read(lambda txn: _read_config(txn, h))
            if config is None:
                raise StoreError(f"{path} holds an LMDB database without a grass-index store "
                                 "header (still being created, or not a store).")
            _check_format(config, path)
            store = cls(path, h, lock, readonly, config)
            if not readonly:
                arrays.collect_orphans(h, state=store._state)
            return store
        except BaseException:
            if h is not None:
                _env.release(h)
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        if self._h is not None:
            h, self._h = self._h, None
            _env.release(h)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "SketchStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._h is None else f"{self.num_rows} rows"
        return f"SketchStore({self.path!r}, dim={self.dim}, {state})"

    # -- properties -----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return json.loads(json.dumps(self._config["meta"]))  # a copy: the stored meta is fixed

    @property
    def dim(self) -> int:
        return self._config["dim"]

    @property
    def committed_blocks(self) -> int:
        return self._progress()[0]

    @property
    def num_rows(self) -> int:
        return self._progress()[1]

    def _handle(self):
        if self._h is None:
            raise StoreError(f"the store at {self.path} is closed")
        return self._h

    def _writable(self):
        h = self._handle()
        if self.readonly:
            raise StoreError(f"the store at {self.path} was opened read-only; use "
                             "SketchStore.open(path, readonly=False) to write.")
        return h

    def _progress(self) -> tuple[int, int]:
        h = self._handle()
        return h.read(lambda txn: _read_progress(txn, h))

    def _state(self) -> str:
        b, n = self._progress()
        return f"{b} blocks, {n} rows"

    # -- rows -----------------------------------------------------------------------------------
    def put_block(self, block_no: int, start_id: int, rows, digest: bytes | None = None
                  ) -> None:
        """Append block ``block_no`` (rows with ids start_id..) atomically with the counter.

        ``digest`` is the data fingerprint of the block's examples (bytes), committed in the
        same transaction so a resumed build can check that the data it skips is unchanged.
        Re-putting an already committed identical block is a no-op (resume); different contents
        are refused, since a resumed build must reproduce the same batches.
        """
        h = self._writable()
        block_no, start_id = _int(block_no, "block_no"), _int(start_id, "start_id")
        rows = self._check_rows(rows, start_id)
        value = codec.encode_block(start_id, rows)
        if digest is not None and h.dbs.get("digests") is None:
            raise StoreError(f"the store at {self.path} predates data fingerprints; rebuild it")

        def put(txn):
            committed, nrows = _read_progress(txn, h)
            if block_no < committed:
                old = txn.get(codec.key(block_no), db=h.dbs["blocks"])
                old_start, old_rows = codec.decode_block(old, where=f"block {block_no}")
                if old_start != start_id or old_rows.shape != rows.shape or \
                        memoryview(old_rows).cast("B") != memoryview(rows).cast("B"):
                    raise StoreError(
                        f"block {block_no} is already committed with different contents "
                        f"(stored: ids {old_start}..{old_start + len(old_rows) - 1}; given: ids "
                        f"{start_id}..{start_id + len(rows) - 1}, or other values). A resumed "
                        "build must reproduce the same batches: keep the seed, batch size and data "
                        "order, or delete the store to rebuild.")
                return
            if block_no > committed:
                raise StoreError(f"blocks must be written in order: the store has {committed} "
                                 f"blocks, so the next one is block {committed}, not {block_no}.")
            if start_id != nrows:
                raise StoreError(f"block {block_no} starts at id {start_id} but the store holds "
                                 f"{nrows} rows; ids must be contiguous (start_id={nrows}).")
            txn.put(codec.key(block_no), value, db=h.dbs["blocks"], append=True)
            txn.put(codec.key(start_id), codec.key(block_no), db=h.dbs["starts"], append=True)
            if digest is not None:
                txn.put(codec.key(block_no), bytes(digest), db=h.dbs["digests"])
            txn.put(b"progress", _PROGRESS.pack(committed + 1, nrows + len(rows)),
                    db=h.dbs["info"])

        h.write(put, state=self._state, need_bytes=len(value))

    def grow_block(self, block_no: int, rows, digest: bytes | None = None) -> None:
        """Append ``rows`` to the last committed block (a short last batch that a living index's
        new examples fill up), atomically with the counter: the block keeps its earlier rows
        bit for bit, so a reader of the earlier generation reads the same ids unchanged.
        ``digest``: the new examples' fingerprints, appended to the block's (same tag)."""
        h = self._writable()
        block_no = _int(block_no, "block_no")

        def put(txn):
            committed, nrows = _read_progress(txn, h)
            if block_no != committed - 1:
                raise StoreError(f"only the last block ({committed - 1}) can grow, not {block_no}")
            start, old = codec.decode_block(txn.get(codec.key(block_no), db=h.dbs["blocks"]),
                                            where=f"block {block_no}")
            new = self._check_rows(rows, start + len(old))
            txn.put(codec.key(block_no), codec.encode_block(start, np.concatenate([old, new])),
                    db=h.dbs["blocks"])
            if digest is not None and h.dbs.get("digests") is not None:
                stored = txn.get(codec.key(block_no), db=h.dbs["digests"])
                if stored is not None:
                    tag = bytes(stored)[:len(bytes(stored)) - 16 * len(old)]
                    txn.put(codec.key(block_no), bytes(stored) + bytes(digest)[len(tag):],
                            db=h.dbs["digests"])
            txn.put(b"progress", _PROGRESS.pack(committed, nrows + len(new)), db=h.dbs["info"])

        h.write(put, state=self._state, need_bytes=(np.asarray(rows).nbytes + 64) * 2)

    def truncate(self, num_rows: int, block_size: int) -> None:
        """Roll the store back to its first ``num_rows`` rows (blocks of ``block_size``; the
        last one cut short) in one transaction: an abandoned add of a living index."""
        h = self._writable()
        num_rows, block_size = _int(num_rows, "num_rows"), _int(block_size, "block_size")

        def cut(txn):
            committed, nrows = _read_progress(txn, h)
            if num_rows > nrows:
                raise StoreError(f"cannot truncate {nrows} rows to {num_rows}")
            keep = -(-num_rows // block_size)
            for b in range(keep, committed):
                buf = txn.get(codec.key(b), db=h.dbs["blocks"])
                if buf is not None:
                    start, _ = codec.decode_block(buf, where=f"block {b}", verify=False)
                    txn.delete(codec.key(start), db=h.dbs["starts"])
                txn.delete(codec.key(b), db=h.dbs["blocks"])
                if h.dbs.get("digests") is not None:
                    txn.delete(codec.key(b), db=h.dbs["digests"])
            if keep and num_rows < keep * block_size and keep <= committed:
                last = keep - 1
                start, rows = codec.decode_block(txn.get(codec.key(last), db=h.dbs["blocks"]),
                                                 where=f"block {last}")
                txn.put(codec.key(last), codec.encode_block(start, rows[:num_rows - start].copy()),
                        db=h.dbs["blocks"])
                stored = h.dbs.get("digests") and txn.get(codec.key(last), db=h.dbs["digests"])
                if stored:
                    stored = bytes(stored)
                    tag = len(stored) - 16 * len(rows)
                    txn.put(codec.key(last), stored[:tag + 16 * (num_rows - start)],
                            db=h.dbs["digests"])
            txn.put(b"progress", _PROGRESS.pack(min(keep, committed), num_rows), db=h.dbs["info"])

        h.write(cut, state=self._state)

    def block_digest(self, block_no: int) -> bytes | None:
        """The data fingerprint committed with block ``block_no`` (None when none was)."""
        h = self._handle()
        if h.dbs.get("digests") is None:
            return None
        return h.read(lambda txn: (lambda v: None if v is None else bytes(v))(
            txn.get(codec.key(_int(block_no, "block_no")), db=h.dbs["digests"])))

    def damaged_blocks(self) -> list[int]:
        """Committed blocks whose bytes fail their checksum or header (damaged on disk)."""
        h = self._handle()
        end, bad = self.committed_blocks, []
        for b in range(end):
            if not h.read(lambda txn, b=b: _healthy(txn.get(codec.key(b), db=h.dbs["blocks"]), b)):
                bad.append(b)
        return bad

    def replace_block(self, block_no: int, start_id: int, rows) -> None:
        """Rewrite a committed block that is damaged on disk with recomputed rows (same ids,
        same shape); used by repair. A healthy block is never replaced."""
        h = self._writable()
        block_no, start_id = _int(block_no, "block_no"), _int(start_id, "start_id")
        rows = self._check_rows(rows, start_id)
        value = codec.encode_block(start_id, rows)

        def put(txn):
            if block_no >= _read_progress(txn, h)[0]:
                raise StoreError(f"block {block_no} is not committed; nothing to replace")
            if _healthy(txn.get(codec.key(block_no), db=h.dbs["blocks"]), block_no):
                raise StoreError(f"block {block_no} is healthy; it is never replaced")
            start = txn.get(codec.key(start_id), db=h.dbs["starts"])
            if start is None or codec.unkey(start) != block_no:
                raise StoreError(f"block {block_no} does not start at id {start_id}")
            txn.put(codec.key(block_no), value, db=h.dbs["blocks"])

        h.write(put, state=self._state, need_bytes=len(value))

    def _check_rows(self, rows, start_id: int) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim or rows.shape[0] == 0:
            raise StoreError(f"rows must have shape (b >= 1, dim={self.dim}), got {rows.shape}")
        if rows.dtype != np.float32:
            raise StoreError(f"rows must be float32, got {rows.dtype} (convert with "
                             ".astype(np.float32) if the precision loss is intended)")
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = (start_id + np.flatnonzero(~finite)[:10]).tolist()
            raise StoreError(f"rows for training ids {bad} contain NaN or inf; nothing was stored. "
                             "Check the loss/gradients of those examples.")
        return np.ascontiguousarray(rows)

    def iter_blocks(self, start_block: int = 0, *, verify: bool = True
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start_id, rows) for blocks start_block..committed-1 (count fixed at the call).

        Committed blocks never change, so reading them in several short transactions is the
        same snapshot as one long one, without pinning pages or blocking map growth.
        """
        end = self.committed_blocks
        b = _int(start_block, "start_block")
        while b < end:
            got: list = []
            b += self._visit_blocks(b, end, lambda s, rows: got.append((s, rows.copy())),
                                    verify)
            yield from got

    def scan_blocks(self, fn: Callable[[int, np.ndarray], None], *, limit: int | None = None,
                    verify: bool = True) -> None:
        """``fn(start_id, rows)`` for every committed block (ids below ``limit``), in id order,
        with ``rows`` a read-only view of the block in LMDB's memory map: no copy (an exact
        scan reads GBs per query); ``fn`` must not keep it. Short transactions, as
        ``iter_blocks``."""
        def visit(s, rows):
            if limit is not None and s >= limit:
                return False
            fn(s, rows if limit is None else rows[:limit - s])
            return True
        end = self.committed_blocks
        b = 0
        while b < end:
            b += self._visit_blocks(b, end, visit, verify)

    def _visit_blocks(self, b0: int, end: int, visit, verify: bool) -> int:
        """``visit(start_id, rows view)`` for blocks b0.. in one read transaction of about
        _READ_BATCH_BYTES; how many blocks it covered (all up to ``end`` once ``visit``
        returns False)."""
        h = self._handle()

        def read(txn):
            size, i = 0, b0
            while i < end and size < _READ_BATCH_BYTES:
                buf = txn.get(codec.key(i), db=h.dbs["blocks"])
                if buf is None:
                    raise StoreError(f"block {i} is missing although {end} blocks are "
                                     "committed; the store is corrupted — rebuild it.")
                s, rows = codec.decode_block(buf, where=f"block {i}", verify=verify)
                if visit(s, rows) is False:
                    return end - b0
                size += len(buf)
                i += 1
            return i - b0
        return h.read(read)

    def get_rows(self, ids: Sequence[int], *, verify: bool = True) -> np.ndarray:
        """Rows for the given training ids, in the given order (duplicates allowed)."""
        h = self._handle()
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise StoreError(f"ids must be a 1-D sequence of integers, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if not len(ids):
            return out
        order = np.argsort(ids, kind="stable")

        def read(txn):
            n = _read_progress(txn, h)[1]
            lo, hi = int(ids[order[0]]), int(ids[order[-1]])
            if lo < 0 or hi >= n:
                raise IndexError(f"training id {lo if lo < 0 else hi} is out of range: the store "
                                 f"holds ids 0..{n - 1}")
            cur = txn.cursor(db=h.dbs["starts"])
            s = e = -1
            rows = None
            for pos in order:
                i = int(ids[pos])
                if not (s <= i < e):
                    found = cur.set_range(codec.key(i))
                    if not found or codec.unkey(cur.key()) != i:  # step back to the block before
                        if not (cur.prev() if found else cur.last()):
                            raise StoreError(f"no block holds id {i}; the store is corrupted.")
                    bno = bytes(cur.value())
                    buf = txn.get(bno, db=h.dbs["blocks"])
                    s, rows = codec.decode_block(buf, where=f"block {codec.unkey(bno)}",
                                                 verify=verify)
                    e = s + len(rows)
                    if not (s <= i < e):
                        raise StoreError(f"block index disagrees with block {codec.unkey(bno)} "
                                         f"for id {i}; the store is corrupted — rebuild it.")
                out[pos] = rows[i - s]
        h.read(read)
        return out

    # -- arrays and small metadata --------------------------------------------------------------
    def put_array(self, name: str, arr) -> None:
        """Store a numeric array atomically (dtype and shape preserved); replaces any old one."""
        arrays.put_array(self._writable(), name, arr, state=self._state)

    def get_array(self, name: str, *, mapped: bool = False) -> np.ndarray:
        """The array ``name``, checksummed whole; ``mapped``: a large (file) array is
        memory-mapped read-only and only its size, header, shape and dtype are checked (a
        query's way: `grass-index verify` checks every checksum)."""
        return arrays.get_array(self._handle(), name, mapped=mapped)

    def delete_array(self, name: str) -> bool:
        """Remove a named array atomically; returns False when there was none."""
        return arrays.delete_array(self._writable(), name, state=self._state)

    def has_array(self, name: str) -> bool:
        h = self._handle()
        return h.read(lambda txn: arrays.read_header(txn, h, name) is not None)

    def array_names(self) -> list[str]:
        h = self._handle()
        return h.read(lambda txn: arrays.array_names_txn(txn, h))

    def put_meta(self, key: str, value: Any) -> None:
        """Set a small JSON value (e.g. "status"); separate from the fixed creation ``meta``."""
        h = self._writable()
        if not isinstance(key, str) or not key:
            raise StoreError(f"meta key must be a non-empty string, got {key!r}")
        raw = json.dumps(_checked_json(value, f"meta value for {key!r}")).encode()
        h.write(lambda txn: txn.put(key.encode(), raw, db=h.dbs["kv"]), state=self._state)

    def get_meta(self, key: str, default: Any = None) -> Any:
        h = self._handle()
        raw = h.read(lambda txn: (lambda v: None if v is None else bytes(v))(
            txn.get(key.encode(), db=h.dbs["kv"])))
        return default if raw is None else json.loads(raw)

    def all_meta(self) -> dict:
        h = self._handle()
        return h.read(lambda txn: {bytes(k).decode(): json.loads(bytes(v))
                                   for k, v in txn.cursor(db=h.dbs["kv"]).iternext()})

    # -- inspection -----------------------------------------------------------------------------
    def describe(self) -> dict:
        """Counts, sizes and format facts for ``grass-index info``."""
        h = self._handle()
        b, n = self._progress()
        data = os.path.join(self.path, _env.DATA_FILE)
        return {"path": self.path, "format": self._config["format"], "dim": self.dim,
                "committed_blocks": b, "num_rows": n,
                "disk_bytes": os.stat(data).st_blocks * 512,
                "raw_row_bytes": n * self.dim * 4, "map_size": h.env.info()["map_size"],
                "lmdb_engine": list(_engine(h)), "arrays": self.array_names(),
                "meta": self.meta, "kv": self.all_meta()}

    def verify(self) -> list[str]:
        """Check every block and array (checksums, id contiguity, counters); [] means healthy."""
        h = self._handle()
        problems: list[str] = []

        def snapshot(txn):  # counter and table sizes from one transaction: a writer may be
            c, n = _read_progress(txn, h)  # committing more blocks while we check these
            return c, n, txn.stat(h.dbs["blocks"])["entries"], txn.stat(h.dbs["starts"])["entries"]
        committed, nrows, nb, ns = h.read(snapshot)
        expect = 0
        try:
            for b, (s, rows) in enumerate(self.iter_blocks()):
                if b >= committed:  # committed after the snapshot
                    break
                if s != expect:
                    problems.append(f"block {b} starts at id {s}, expected {expect}")
                expect = s + len(rows)
        except StoreError as e:
            problems.append(str(e))
            return problems
        if expect != nrows:
            problems.append(f"blocks hold {expect} rows but the counter says {nrows}")

        if nb != committed or ns != committed:
            problems.append(f"{nb} blocks / {ns} index entries stored but {committed} committed")
        for name in self.array_names():
            try:
                self.get_array(name)
            except GrassIndexError as e:  # StoreError, or a file refused by the file rule
                problems.append(str(e))
        return problems + self.file_problems()

    def file_problems(self) -> list[str]:
        """Entries of the store directory that are not regular files or real directories, and
        array headers naming files that are not this store's: the file rule (fileio), checked
        without reading any data."""
        return check_tree(self.path) + arrays.file_problems(self._handle())


def _healthy(buf, block_no: int) -> bool:
    if buf is None:
        return False
    try:
        codec.decode_block(buf, where=f"block {block_no}")
    except StoreError:
        return False
    return True


def writer_lock(path, *, wait_s: float = 0.0) -> WriterLock:
    """Acquire the writer lock of the store at ``path`` (creating the directory) before the
    store exists, so a build can claim its output directory under the lock; hand it to
    :meth:`SketchStore.create` (or release it). ``wait_s``: keep trying that long (claims
    that hold it for milliseconds, e.g. workers of one build, queue instead of failing)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    lock = WriterLock(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            return lock
        except WriterLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _engine(h) -> tuple:
    try:
        return tuple(h.env.lib_version())
    except AttributeError:  # lmdb < 3
        import lmdb
        return tuple(lmdb.version())


def _read_config(txn, h):
    raw = txn.get(b"config", db=h.dbs["info"])
    return None if raw is None else json.loads(bytes(raw))


def _read_progress(txn, h) -> tuple[int, int]:
    raw = txn.get(b"progress", db=h.dbs["info"])
    if raw is None:
        raise StoreError(f"the store at {h.path} has no progress record; it is corrupted.")
    return _PROGRESS.unpack(bytes(raw))


def _init(txn, h, config: dict) -> None:
    if txn.stat(h.dbs["blocks"])["entries"]:
        raise StoreError(f"{h.path} has blocks but no header; it is corrupted — delete it.")
    txn.put(b"config", json.dumps(config).encode(), db=h.dbs["info"])
    txn.put(b"progress", _PROGRESS.pack(0, 0), db=h.dbs["info"])


def _check_format(config: dict, path: str) -> None:
    if config.get("format", 0) > FORMAT:
        raise StoreError(f"the store at {path} uses format {config['format']}, newer than this "
                         f"grass-index understands ({FORMAT}); upgrade grass-index.")
