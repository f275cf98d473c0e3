"""LMDB environment handling: engine choice, one shared env per path per process, map growth.

py-lmdb >= 2 refuses to open one environment twice in a process, so handles are shared and
reference-counted. Every transaction here is short-lived (no transaction is held across calls),
which is what makes growing the map (``set_mapsize``) safe within the process.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

import lmdb

from ..fileio import check_dir, check_in_place, check_regular
from .errors import StoreError

T = TypeVar("T")

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"  # LMDB's reader table: written in place by every open, even read-only
DB_NAMES = ("info", "kv", "blocks", "starts", "arrays", "chunks")
# Tables added after the first release: stores written before them open without them.
OPTIONAL_DB_NAMES = ("digests",)  # block number -> the data fingerprint of its examples
INITIAL_MAP_SIZE = 1 << 30  # grows by doubling; on 64-bit this is only reserved address space
# New stores use the LMDB 0.9 on-disk format so they stay readable by lmdb 1.x/2.x (pyproject
# allows lmdb>=1.4). lmdb 3 bundles 0.9 and 1.0 engines whose formats cannot read each other.
NEW_STORE_LIB_VERSION = 0

_registry: dict[str, "EnvHandle"] = {}
_registry_lock = threading.Lock()


class EnvHandle:
    """An open LMDB environment plus its named databases, shared by the stores of one process."""

    def __init__(self, path: str, env: lmdb.Environment, readonly: bool):
        self.path = path
        self.env = env
        self.readonly = readonly
        self.refs = 1
        self.dbs = {}
        try:
            for name in DB_NAMES:
                self.dbs[name] = env.open_db(name.encode(), create=not readonly)
            for name in OPTIONAL_DB_NAMES:
                try:
                    self.dbs[name] = env.open_db(name.encode(), create=not readonly)
                except lmdb.NotFoundError:
                    self.dbs[name] = None
        except lmdb.NotFoundError:
            env.close()
            raise StoreError(f"{path} is an LMDB database but not a grass-index sketch store "
                             "(its tables are missing), or it is still being created. "
                             "Point at the right directory or rebuild.") from None

    # -- transactions -------------------------------------------------------------------------
    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run fn in a read transaction, adopting a map grown by a writer in another process."""
        for _ in range(8):
            try:
                with self.env.begin(buffers=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # 0 = adopt the size the writer set
            except lmdb.Error as e:
                raise StoreError(f"reading the store at {self.path} failed: {e}. The store may be "
                                 "corrupted; run its verify() or rebuild it.") from e
        raise StoreError(f"the store at {self.path} kept being resized while reading; retry.")

    def write(self, fn: Callable[[lmdb.Transaction], T], *, state: Callable[[], str],
              need_bytes: int = 0) -> T:
        """Run fn in one write transaction; grow the map and retry when it is full.

        Any other failure (disk full, I/O error) aborts the transaction, so the store stays at
        its last committed state; the StoreError says so (``state()`` describes that state).
        """
        if self.readonly:
            raise StoreError(f"the store at {self.path} is open read-only; "
                             "open it with readonly=False (one writer at a time) to write.")
        while True:
            try:
                with self.env.begin(write=True, buffers=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow(need_bytes)
            except StoreError:
                raise
            except (lmdb.Error, OSError) as e:
                raise StoreError(
                    f"writing to the store at {self.path} failed ({type(e).__name__}: {e}). "
                    f"Nothing of this write was kept: the store is at its last committed state "
                    f"({state()}). Fix the cause (e.g. free disk space) and resume.") from e

    def _grow(self, need_bytes: int) -> None:
        cur = self.env.info()["map_size"]
        new = max(2 * cur, cur + 2 * need_bytes)
        try:
            self.env.set_mapsize(new)
        except lmdb.Error as e:
            raise StoreError(f"could not grow the LMDB map of {self.path} from {cur} to {new} "
                             f"bytes: {e}") from e

    def sync(self) -> None:
        if not self.readonly:
            self.env.sync(True)


def _open_env(path: str, *, readonly: bool, create: bool) -> lmdb.Environment:
    exists = os.path.exists(os.path.join(path, DATA_FILE))
    kwargs = dict(subdir=True, readonly=readonly, create=create and not readonly,
                  map_size=INITIAL_MAP_SIZE, max_dbs=len(DB_NAMES) + len(OPTIONAL_DB_NAMES) + 2,
                  readahead=False,
                  max_spare_txns=0)
    if not exists and not readonly:
        try:  # choose the on-disk format explicitly for new stores (lmdb >= 3)
            return lmdb.open(path, lib_version=NEW_STORE_LIB_VERSION, **kwargs)
        except TypeError:  # lmdb < 3 has a single engine and no lib_version argument
            pass
    # Existing stores: let the data file's own format select the engine.
    return lmdb.open(path, **kwargs)


def acquire(path: str, *, readonly: bool, create: bool) -> EnvHandle:
    """Open (or share) the environment at ``path``; release it with :func:`release`."""
    key = os.path.realpath(path)
    with _registry_lock:
        h = _registry.get(key)
        if h is not None:
            if h.readonly and not readonly:
                raise StoreError(
                    f"the store at {path} is already open read-only in this process; close those "
                    "read-only SketchStore objects before opening it for writing.")
            h.refs += 1
            return h
        check_lmdb_files(path, readonly=readonly)
        _check_not_truncated_file(path)
        try:
            env = _open_env(path, readonly=readonly, create=create)
        except lmdb.Error as e:
            raise StoreError(
                f"cannot open the LMDB store at {path}: {e}. The data file is not a valid LMDB "
                "database (corrupted or truncated?) or was written by a newer LMDB format "
                "(upgrade the lmdb package). Rebuild the store if it is damaged.") from e
        h = EnvHandle(path, env, readonly)
        _check_not_truncated(h)
        if not readonly:
            h.env.reader_check()  # clear reader slots left by killed processes
            if env.info()["map_size"] < INITIAL_MAP_SIZE:
                env.set_mapsize(INITIAL_MAP_SIZE)
        _registry[key] = h
        return h


def release(h: EnvHandle) -> None:
    with _registry_lock:
        h.refs -= 1
        if h.refs == 0:
            _registry.pop(os.path.realpath(h.path), None)
            h.sync()
            h.env.close()


def check_lmdb_files(path: str, *, readonly: bool) -> None:
    """LMDB opens ``data.mdb`` and ``lock.mdb`` itself, following symlinks, and writes the lock
    file on every open (read-only too): before it does, the store must be a real directory and
    both files regular (the lock file, and a data file opened for writing, with no other
    name), so a planted symlink or hard link cannot make it write elsewhere."""
    check_dir(path)
    check_in_place(os.path.join(path, LOCK_FILE))
    data = os.path.join(path, DATA_FILE)
    if readonly:
        check_regular(data)
    else:
        check_in_place(data)


def _check_not_truncated_file(path: str) -> None:
    data = os.path.join(path, DATA_FILE)
    if os.path.exists(data) and os.path.getsize(data) < 2 * 4096:
        raise StoreError(f"{data} is truncated ({os.path.getsize(data)} bytes, smaller than LMDB's "
                         "two meta pages). The store is damaged; rebuild it.")


def _check_not_truncated(h: EnvHandle) -> None:
    """A data file shorter than its last used page would SIGBUS on access through the mmap."""
    info, stat = h.env.info(), h.env.stat()
    need = (info["last_pgno"] + 1) * stat["psize"]
    data = os.path.join(h.path, DATA_FILE)
    size = os.path.getsize(data)
    if size < need:
        h.env.close()
        raise StoreError(f"{data} is truncated: {size} bytes but its pages extend to {need} bytes. "
                         "The store is damaged (copied partially?); rebuild it.")
