"""config.json, the record of a finished index: reading and validating it, and a typed
read-only view of it for readers (the CLI, verify, describe, services).

config.json holds build.json's keys plus what pass 2 did (``hessian``, ``damping``,
``damping_used``, ``preconditioner``, ``index``, ``index_kind``, ``index_files``, ...), the
versions that wrote it and ``config_hash`` over all of it but ``created``; it is written last
and atomically, so an index is complete exactly when config.json exists.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .. import __version__
from ..store import SketchStore
from ..untrusted import UnsafeNameError, plain_file_name
from .errors import AttributionError
from .files import BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, STORE_DIR, jsonable
from .fingerprints import config_hash
from .record import sketched_batches


def read_config(path: Path) -> dict:
    """config.json of the index in ``path``, checked (format, hash, plain file names, and
    agreement with the sketch store's own record); clear errors for a missing, unfinished,
    corrupted, modified or foreign directory."""
    path = Path(path)
    if not path.is_dir():
        raise AttributionError(f"index directory {path} not found; build one with "
                               "`grass-index build TASK --out DIR`")
    cfile = path / CONFIG_FILE
    if not cfile.is_file():
        if (path / BUILD_FILE).is_file():
            done = sketched_batches(path)
            progress = f" ({done[0]} of {done[1]} batches sketched)" if done else ""
            raise AttributionError(f"the build in {path} is not finished{progress}; re-run the "
                                   "same build command to resume it")
        raise AttributionError(f"{path} is not a grass-index index (no {CONFIG_FILE}); pass the "
                               "--out directory of `grass-index build`")
    try:
        cfg = json.loads(cfile.read_text())
    except ValueError as e:
        raise AttributionError(f"{cfile} is corrupted ({e}); run `grass-index verify {path} "
                               "--repair` to restore it from the sketch store") from e
    if not isinstance(cfg, dict) or cfg.get("library") != "grass-index":
        raise AttributionError(f"{cfile} is not a grass-index config; rebuild the index")
    fmt = cfg.get("format")
    if fmt != FORMAT_VERSION:  # older formats (or none) are as unreadable as newer ones
        newer = isinstance(fmt, int) and fmt > FORMAT_VERSION
        raise AttributionError(f"{path} was written by grass-index {cfg.get('version')} (format "
                               f"{fmt}); this is {__version__} (format {FORMAT_VERSION}): "
                               + ("upgrade grass-index" if newer else
                                  "rebuild the index with this version"))
    if cfg.get("config_hash") != config_hash(cfg):
        raise AttributionError(f"{cfile} was modified after the build (config hash mismatch); "
                               f"run `grass-index verify {path} --repair` to restore it from "
                               "the sketch store")
    check_file_names(path, cfg)
    _check_against_store(path, cfg)
    return cfg


def check_file_names(path: Path, cfg: dict) -> None:
    """File names a config points at are plain names inside the index directory."""
    try:
        for name in [cfg.get("index_file")] + list(cfg.get("index_files") or []):
            plain_file_name(name, f"{path / CONFIG_FILE}: index file")
    except UnsafeNameError as e:
        raise AttributionError(str(e).replace("DIR", str(path))) from None


# Fields of config.json that the store's own records fix for the life of a build (every refit
# keeps them); the config hash is unkeyed, so anyone can edit config.json and re-hash it.
TASK_FIELDS = ("task", "task_sha256")


def config_store_diff(path: Path, cfg: dict) -> list[str] | None:
    """Fields where ``cfg`` disagrees with the sketch store's creation record (the build) and
    its copy of the config (the task); None when the store cannot be read."""
    try:
        with SketchStore.open(Path(path) / STORE_DIR, readonly=True) as st:
            created, stored = st.meta, st.get_meta("config", None)
    except Exception:
        return None
    diff = [k for k in sorted(created) if jsonable(created[k]) != jsonable(cfg.get(k))]
    if isinstance(stored, dict):
        diff += [k for k in TASK_FIELDS if stored.get(k) != cfg.get(k)]
    return diff


def _check_against_store(path: Path, cfg: dict) -> None:
    diff = config_store_diff(path, cfg)
    if diff:
        raise AttributionError(
            f"{path / CONFIG_FILE} disagrees with the sketch store's own record of this build "
            f"(differs in: {', '.join(diff)}): it was edited, or belongs to another build; run "
            f"`grass-index verify {path} --repair` to restore it from the store")


class IndexConfig:
    """Typed, read-only view of a config.json dict: readers use these names instead of raw
    keys (``raw`` is the whole dict, read-only, for the rest)."""

    def __init__(self, config: Mapping[str, Any]):
        self.raw = MappingProxyType(dict(config))

    def _get(self, key, default=None):
        return self.raw.get(key, default)

    # what the sketches are
    n_train = property(lambda self: int(self.raw["n_train"]))
    dim = property(lambda self: int(self.raw["dim"]))
    layout = property(lambda self: {k: int(v) for k, v in self.raw["layout"].items()})
    layer_dims = property(lambda self: list(self.raw.get("layer_dims") or []))
    layers_described = property(lambda self: dict(self.raw.get("layers_described") or {}))
    sparsification = property(lambda self: self.raw["sparsification"])
    projection = property(lambda self: self.raw["projection"])
    seed = property(lambda self: self.raw["seed"])
    batch_size = property(lambda self: int(self.raw["batch_size"]))
    # an ensemble's scores average over this many checkpoints (its layout keys: c{c}/{layer})
    checkpoints = property(lambda self: int(self._get("checkpoints") or 1))
    n_blocks = property(lambda self: self._get("n_blocks"))
    task = property(lambda self: self._get("task"))
    task_sha256 = property(lambda self: self._get("task_sha256"))
    # what pass 2 did
    hessian = property(lambda self: self.raw["hessian"])
    damping = property(lambda self: self._get("damping"))
    damping_used = property(lambda self: self._get("damping_used"))
    index_kind = property(lambda self: self._get("index_kind") or (self.index or {}).get("kind"))
    index = property(lambda self: dict(self._get("index") or {}))
    index_files = property(lambda self: list(self._get("index_files") or [self.raw["index_file"]]))
    preconditioner_key = property(lambda self: self.raw["preconditioner_key"])
    # provenance
    version = property(lambda self: self._get("version"))
    torch_version = property(lambda self: self._get("torch"))
    config_hash = property(lambda self: self._get("config_hash"))
    created = property(lambda self: self._get("created"))

    @property
    def recall(self) -> dict | None:
        """The measured recall of the FAISS index ({k, recall, queries, ...}), when recorded."""
        return self.index.get("recall")

    def __repr__(self) -> str:
        return f"IndexConfig(n_train={self.n_train}, dim={self.dim}, hessian={self.hessian})"
