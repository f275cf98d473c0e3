"""Arguments and records of a build: checking build arguments, claiming the output directory
(build.json), and reading/validating a finished index's config.json."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..precondition import parse_damping
from ..index import SPECS, FaissIndexError, parse_spec
from ..store import SketchStore, writer_lock
from ..store._env import DATA_FILE
from ..untrusted import UnsafeNameError, plain_file_name
from .errors import AttributionError
from .files import (_OUR_FILES, BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, MASK_FILE, STORE_DIR,
                    _jsonable, _write_json)
from .fingerprints import config_hash

HESSIANS = {"efim": "eFIM", "identity": "identity"}
CLAIM_WAIT_S = 30.0  # a worker waits this long for the lock another worker's claim holds
INDEX_KINDS = SPECS  # flat, ivf, flat:fp16, ivf:fp16


def _norm_hessian(hessian: str) -> str:
    h = HESSIANS.get(str(hessian).lower())
    if h is None:
        raise AttributionError(f"unknown hessian {hessian!r}; use 'eFIM' or 'identity'")
    return h


def _damping_key(damping) -> Any:
    return None if damping is None else str(damping)


def _check_damping(damping) -> None:
    try:
        parse_damping(damping)
    except ValueError as e:  # the message names the value, the range and why
        raise AttributionError(str(e)) from e


def _check_index(index) -> None:
    try:
        parse_spec(index)
    except FaissIndexError as e:
        raise AttributionError(str(e)) from None


def _check_device(device) -> None:
    """A device that this torch can use, or one line naming what is wrong and the fix."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise AttributionError(f"unknown device {device!r}; use cpu, cuda or cuda:N (a torch "
                               "device string)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AttributionError(f"device {device!r}: this torch ({torch.__version__}) sees no "
                                   "CUDA device; use --device cpu, or install a CUDA build of "
                                   "torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AttributionError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                                   "device(s) are visible; use cuda:0..")
        return
    try:
        torch.empty(1, device=dev)
    except Exception as e:
        raise AttributionError(f"device {device!r} is not usable here ({type(e).__name__}: "
                               f"{e}); use --device cpu") from None


def _check_build_args(train_data: Sequence, *, hessian: str, index: str, batch_size,
                      damping, device=None) -> str:
    """Everything about build_index's arguments checkable without a model; the hessian's
    canonical name."""
    hessian = _norm_hessian(hessian)
    _check_device(device)
    _check_index(index)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AttributionError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_damping(damping)
    if not (hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__")):
        raise AttributionError("train_data must be an indexable sequence (len() and [i])")
    if len(train_data) == 0:
        raise AttributionError("train_data is empty; nothing to index")
    return hessian


def _check_out_dir_free(out: Path) -> None:
    """``out`` is new, empty, or a grass-index build (checked before anything is written)."""
    if out.exists() and not out.is_dir():
        raise AttributionError(f"--out {out} is a file; pass a directory")
    if out.is_dir() and not (out / BUILD_FILE).is_file() and any(
            p.name not in _OUR_FILES and not p.name.startswith((".", "index-"))
            and p.name != MASK_FILE for p in out.iterdir()):
        raise AttributionError(f"output directory {out} is not empty and is not a grass-index "
                               "build; choose a new or empty directory")


def _claim_out_dir_locked(out: Path, build: dict, *, wait_s: float = 0.0):
    """Take the store's writer lock, then claim ``out`` (build.json) while holding it: two
    builds into one new directory cannot both claim it. Returns the held lock, for
    ``SketchStore.create(..., lock=)`` (a worker's claim releases it at once)."""
    _check_out_dir_free(out)
    lock = writer_lock(out / STORE_DIR, wait_s=wait_s)
    try:
        _claim_out_dir(out, build)
    except BaseException:
        lock.release()
        raise
    return lock


def _build_diff(old: dict, build: dict) -> str:
    diff = sorted(k for k in set(old) | set(build)
                  if _jsonable(old.get(k)) != _jsonable(build.get(k)))
    if len(diff) > 1 and "sketch_fingerprint" in diff:  # derived: name the cause only
        diff.remove("sketch_fingerprint")
    hint = ""
    if "model_hash" in diff:
        hint = " (the model's weights differ)"
    elif "data_hash" in diff or "n_train" in diff:
        hint = " (the training data differs)"
    return f"differs in: {', '.join(diff)}){hint}"


def _claim_out_dir(out: Path, build: dict) -> None:
    """Refuse a directory holding something else; record what this build's sketches mean."""
    bfile = out / BUILD_FILE
    _check_out_dir_free(out)
    if bfile.is_file():
        try:
            old = json.loads(bfile.read_text())
        except ValueError as e:
            raise AttributionError(f"{bfile} is corrupted ({e}); run `grass-index verify {out} "
                                   "--repair` to restore it from the sketch store") from e
        if _jsonable(old) != _jsonable(build):
            raise AttributionError(
                f"output directory {out} holds a different build ({_build_diff(old, build)}; "
                f"choose another --out or delete {out} to rebuild")
        return
    if (out / STORE_DIR / DATA_FILE).exists():  # build.json lost: the store's own record
        try:
            with SketchStore.open(out / STORE_DIR, readonly=True) as st:
                created = st.meta
        except Exception as e:
            raise AttributionError(f"{out} has sketches but no {BUILD_FILE}, and its store is "
                                   f"unreadable ({e}); delete {out} and rebuild") from e
        if _jsonable(created) != _jsonable(build):
            raise AttributionError(
                f"output directory {out} holds a different build ({_build_diff(created, build)}"
                f"; choose another --out or delete {out} to rebuild")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(bfile, build)
def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise AttributionError(f"index directory {path} not found; build one with "
                               "`grass-index build TASK --out DIR`")
    cfile = path / CONFIG_FILE
    if not cfile.is_file():
        progress = ""
        try:
            b = json.loads((path / BUILD_FILE).read_text())
            with SketchStore.open(path / STORE_DIR, readonly=True) as st:
                done = st.committed_blocks
            progress = f" ({done} of {math.ceil(b['n_train'] / b['batch_size'])} batches sketched)"
        except Exception:
            pass
        if (path / BUILD_FILE).is_file():
            raise AttributionError(f"the build in {path} is not finished{progress}; re-run the same "
                                   "build command to resume it")
        raise AttributionError(f"{path} is not a grass-index index (no {CONFIG_FILE}); pass the "
                               "--out directory of `grass-index build`")
    try:
        cfg = json.loads(cfile.read_text())
    except ValueError as e:
        raise AttributionError(f"{cfile} is corrupted ({e}); run `grass-index verify {path} "
                               "--repair` or rebuild") from e
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
    _check_file_names(path, cfg)
    _check_against_store(path, cfg)
    return cfg


def _check_file_names(path: Path, cfg: dict) -> None:
    """File names a config points at are plain names inside the index directory."""
    try:
        for name in [cfg.get("index_file")] + list(cfg.get("index_files") or []):
            plain_file_name(name, f"{path / CONFIG_FILE}: index file")
    except UnsafeNameError as e:
        raise AttributionError(str(e).replace("DIR", str(path))) from None


# Fields of config.json that the store's own records fix for the life of a build (every refit
# keeps them); the config hash is unkeyed, so anyone can edit config.json and re-hash it.
_TASK_FIELDS = ("task", "task_sha256")


def config_store_diff(path: Path, cfg: dict) -> list[str] | None:
    """Fields where ``cfg`` disagrees with the sketch store's creation record (the build) and
    its copy of the config (the task); None when the store cannot be read."""
    try:
        with SketchStore.open(path / STORE_DIR, readonly=True) as st:
            created, stored = st.meta, st.get_meta("config", None)
    except Exception:
        return None
    diff = [k for k in sorted(created) if _jsonable(created[k]) != _jsonable(cfg.get(k))]
    if isinstance(stored, dict):
        diff += [k for k in _TASK_FIELDS if stored.get(k) != cfg.get(k)]
    return diff


def _check_against_store(path: Path, cfg: dict) -> None:
    diff = config_store_diff(path, cfg)
    if diff:
        raise AttributionError(
            f"{path / CONFIG_FILE} disagrees with the sketch store's own record of this build "
            f"(differs in: {', '.join(diff)}): it was edited, or belongs to another build; run "
            f"`grass-index verify {path} --repair` to restore it from the store")
