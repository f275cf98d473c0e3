"""describe_index: what `info` shows, for a finished index or a build still running."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..store import SketchStore
from .config import _read_config
from .errors import AttributionError
from .files import BUILD_FILE, CONFIG_FILE, STORE_DIR


def describe_index(path) -> dict:
    """What `info` shows: the config of a finished index, or the progress of a running /
    interrupted build (readable from another process while the build writes)."""
    path = Path(path)
    cfile = path / CONFIG_FILE
    if cfile.is_file():
        cfg = _read_config(path)
        return dict(complete=True, path=str(path), config=cfg)
    bfile = path / BUILD_FILE
    if not bfile.is_file():
        _read_config(path)  # raises the right message
    try:
        build = json.loads(bfile.read_text())
    except ValueError as e:
        raise AttributionError(f"{bfile} is corrupted ({e}); delete {path} and rebuild") from e
    n_blocks = math.ceil(build["n_train"] / build["batch_size"])
    done = 0
    try:
        with SketchStore.open(path / STORE_DIR, readonly=True) as st:
            done = st.committed_blocks
    except Exception:
        pass
    return dict(complete=False, path=str(path), build=build, committed_blocks=done,
                n_blocks=n_blocks)
