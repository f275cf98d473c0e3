"""Single-writer lock: an exclusive, non-blocking flock on ``<store>/writer.lock``.

flock (not LMDB's own writer mutex) so a second build fails fast with a clear message instead
of silently waiting; the kernel drops the lock when the holder dies, even on kill -9. The lock
file is written in place (the holder's pid), so it must be a regular file with one name in a
real directory: opened with O_NOFOLLOW, checked with fstat (fileio's file rule).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time

from ..fileio import UnsafeFileError, check_dir, check_in_place
from .errors import StoreError, WriterLockedError

LOCK_NAME = "writer.lock"


class WriterLock:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        check_dir(os.path.dirname(self.path) or ".")
        check_in_place(self.path)  # never even open a device, FIFO or link found here
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFileError(_unsafe(self.path, "a symlink")) from None
            raise StoreError(f"cannot create the writer lock {self.path}: {e}. "
                             "Check that the directory is writable.") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise UnsafeFileError(_unsafe(self.path, "a hard link to another file"
                                          if stat.S_ISREG(st.st_mode) else "not a regular file"))
        os.set_blocking(fd, True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise WriterLockedError(
                f"the store at {os.path.dirname(self.path)} is already being written by {holder}. "
                "Only one writer is allowed: wait for that build to finish or stop it "
                "(the lock is released automatically when it exits). "
                "To read while it runs, use SketchStore.open(path, readonly=True).") from None
        # Record who holds the lock, for the message above (informational only).
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


def _unsafe(path: str, what: str) -> str:
    return (f"the writer lock {path} is {what}; it must be a regular file inside the store "
            "(the directory was edited or damaged): delete it, then re-run the command")


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    pid = info.get("pid")
    if pid is None:
        return "another process"
    where = "this process" if pid == os.getpid() else "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"{where} (pid {pid} on {info.get('host', '?')}, since {since})"
