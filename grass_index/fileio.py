"""Writing files so that a crash never leaves half of one, and turning values into plain JSON.

The one home of both, used by every floor (pipeline records, eval caches, CLI outputs). FAISS
index files are the exception: faiss writes them itself, to a temp path that
``index/_file.py`` fsyncs and renames the same way.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def atomic_save(path, write: Callable) -> None:
    """Write via ``write(fileobj)`` to a temp file beside ``path``, fsync, then rename: a reader
    sees the old file or the new one, never half of one. The temp name is ``.NAME.tmpPID``, so
    a writer killed mid-way leaves a file the next writer can recognise and remove."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
