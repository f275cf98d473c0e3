"""Every file grass-index reads, writes or deletes goes through here, for two rules:

1. Nothing written is ever half-visible: a write goes to a temp file beside the target
   (created with O_EXCL|O_NOFOLLOW, so it can never be someone else's file), is fsynced,
   renamed over the target, and the directory is fsynced (the one atomic-write helper; FAISS
   files and the store's array files use it too, through :func:`atomic_path`).
2. An index directory is data anyone may have edited, so every file the library opens, locks,
   writes or deletes in one is a *regular file reached inside the directory without following
   a symlink*, its name a plain name: a symlink, FIFO, device or directory where a file should
   be is refused with one line naming it (:class:`UnsafeFileError`) instead of writing through
   the link, deleting in another directory, or blocking forever on a FIFO. A hard link is an
   ordinary regular file here (it is the same file, which the directory's owner could read
   anyway), except where a file is changed in place (LMDB's lock file, the writer lock):
   :func:`check_in_place` refuses one with other links, so locking cannot write into a file
   elsewhere. Files replaced by rename are safe with links: rename replaces the name, not the
   shared inode.

Also here: turning values into plain JSON (``jsonable``), which every record writer uses.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import GrassIndexError, repair_command

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Temp names this module creates: ".NAME.tmp-PID-RANDOM" (hidden, never a plain name).
TEMP_NAME = re.compile(r"\.(?P<target>.+)\.tmp-\d+-[0-9a-f]{8}")


class UnsafeFileError(GrassIndexError, OSError):
    """A path in an index directory is not a regular file (or real directory) reached without
    following a symlink; the message names it."""


class FileWriteError(GrassIndexError, OSError):
    """Writing a file failed (disk full, permissions, a directory in the way); the message
    names the file the user asked for, never the temp file, and says nothing was changed."""


def _kind(mode: int) -> str:
    return ("a symlink" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")


def _refuse(path, what: str, want: str = "regular files") -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} is {what}; grass-index only uses {want} inside an index directory, never "
        "through a symlink (the directory was edited or damaged: remove it, then run "
        f"{repair_command()} or re-run the build)")


# -- checks ------------------------------------------------------------------------------------

def check_dir(path, *, missing_ok: bool = True) -> bool:
    """``path`` is a real directory (not a symlink to one): True; missing: False (or
    FileNotFoundError when not ``missing_ok``); anything else is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return False
        raise
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, _kind(st.st_mode), "real directories")
    return True


def check_regular(path) -> bool:
    """``path`` is a regular file (not a symlink): True; missing: False; else refused. For
    files opened by a library that takes a path (LMDB, FAISS, numpy): checked just before."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, _kind(st.st_mode))
    return True


def check_in_place(path) -> bool:
    """:func:`check_regular` for a file changed in place (a lock file): also refuse a hard
    link, whose other name may be a file outside the directory."""
    if not check_regular(path):
        return False
    if os.lstat(path).st_nlink != 1:
        raise _refuse(path, "a hard link to another file", "files with a single name")
    return True


def check_tree(root) -> list[str]:
    """Every entry under ``root`` that is not a real directory or a regular file (a symlink,
    FIFO, device, socket), as problems for verify; [] when the tree is clean."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(root):  # never descends through a symlink
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                mode = os.lstat(p).st_mode
            except FileNotFoundError:  # removed while we walk (a running writer's temp file)
                continue
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                problems.append(f"{p} is {_kind(mode)}")
    return problems


# -- reading -----------------------------------------------------------------------------------

def open_regular(path, mode: str = "rb"):
    """Open a regular file for reading without following a symlink and without blocking on a
    FIFO (O_NOFOLLOW|O_NONBLOCK, then fstat); anything else is refused naming ``path``."""
    if mode not in ("rb", "r"):
        raise ValueError(f"open_regular reads only ('rb' or 'r'), not {mode!r}")
    if not check_regular(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse(path, "a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between the lstat and the open
            raise _refuse(path, _kind(st.st_mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, encoding="utf-8" if mode == "r" else None)
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path) -> bytes:
    with open_regular(path) as f:
        return f.read()


def read_json(path):
    """The JSON value in ``path`` (a regular file); ValueError when it is not JSON."""
    return json.loads(read_bytes(path))


# -- deleting ----------------------------------------------------------------------------------

def unlink_owned(directory, name: str, owned: re.Pattern) -> bool:
    """Delete ``directory/name`` only if ``directory`` is a real directory, ``name`` matches
    ``owned`` (a name pattern this library writes) and it is a regular file: clean-up never
    deletes through a symlink or a file it did not write. True when something was deleted."""
    if not isinstance(name, str) or not owned.fullmatch(name) or "/" in name:
        return False
    if not check_dir(directory):
        return False
    p = os.path.join(directory, name)
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return False
        os.unlink(p)
    except FileNotFoundError:
        return False
    return True


def remove_stale_temps(directory, target: re.Pattern | None = None) -> int:
    """Delete the temp files a killed writer left in ``directory`` (those of targets matching
    ``target``, default all); the number deleted."""
    if not check_dir(directory):
        return 0
    n = 0
    for name in os.listdir(directory):
        m = TEMP_NAME.fullmatch(name)
        if m and (target is None or target.fullmatch(m["target"])):
            n += unlink_owned(directory, name, TEMP_NAME)
    return n


# -- writing -----------------------------------------------------------------------------------

def fsync_dir(directory) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a fresh temp path beside ``path`` (created empty, exclusively, never through a
    symlink) for a writer that needs a path (FAISS, ``np.save``); on success fsync it, rename
    it over ``path`` and fsync the directory; on any failure remove it, leave ``path`` as it
    was and raise :class:`FileWriteError` naming ``path`` (never the temp name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(21, "Is a directory")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                         0o644))
        yield str(tmp)
        fd = os.open(tmp, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, GrassIndexError):
            raise FileWriteError(e.errno, f"cannot write {path}: {e.strerror or e}; nothing "
                                 "there was changed") from e
        raise
    fsync_dir(path.parent)


def atomic_save(path, write: Callable) -> None:
    """Write via ``write(fileobj)`` atomically (see :func:`atomic_path`): a reader sees the old
    file or the new one, never half of one."""
    with atomic_path(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC), "wb") as f:
            write(f)
            f.flush()


def atomic_write(path, data: bytes) -> None:
    """``atomic_save`` of ready bytes."""
    atomic_save(path, lambda f: f.write(data))


def jsonable(x):
    """Config values as plain JSON: tensors/arrays -> lists, tuples -> lists, numpy scalars ->
    Python numbers, non-finite floats -> their string ('inf', 'nan'), anything else -> str.
    Lenient on purpose: records describe a build, they never fail it."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def write_json(path, obj) -> None:
    """``obj`` (coerced with ``jsonable``) as indented, key-sorted JSON, atomically."""
    atomic_write(path, (json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n").encode())
