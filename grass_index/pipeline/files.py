"""What an index directory is made of (file names) and how files in it are written."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
BUILD_FILE = "build.json"
STORE_DIR = "sketches"
SHARDS_DIR = "shards"  # `build --worker i/n`: one sketch store per worker, shards/i-of-n/
MASK_FILE = "selective_mask.pt"  # copy of the selective-mask file, so queries need only the dir
_OUR_FILES = {CONFIG_FILE, BUILD_FILE, STORE_DIR, SHARDS_DIR}


def _jsonable(x):
    """Config values as plain JSON (tensors/arrays -> lists, tuples -> lists)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())
