"""describe_index: what `info` shows, for a finished index or a build still running."""
from __future__ import annotations

from pathlib import Path

from .. import arguments
from ..fileio import check_regular
from .config import read_config
from .files import BUILD_FILE, CONFIG_FILE
from .record import read_build, sketched_batches


def describe_index(path) -> dict:
    """What `info` shows: the config of a finished index, or the progress of a running /
    interrupted build (readable from another process while the build writes)."""
    path = arguments.directory(path, "describe_index")
    cfile = path / CONFIG_FILE
    if check_regular(cfile):  # a symlink or FIFO there is refused, naming it
        cfg = read_config(path)
        return dict(complete=True, path=str(path), config=cfg)
    if not check_regular(path / BUILD_FILE):
        read_config(path)  # raises the right message
    build = read_build(path)
    done = sketched_batches(path)
    return dict(complete=False, path=str(path), build=dict(build.raw),
                committed_blocks=done[0] if done else 0, n_blocks=build.n_batches)
