"""The build record, build.json: what the raw sketches depend on, written once when a build
claims its output directory, so a re-run can resume it or refuse a different build.

Its keys: ``format``, the BuildOptions (``sparsification``, ``projection``, ``seed``,
``layers``, ``batch_size``), what the model and data give (``layer_dims``, ``layout``, ``dim``,
``n_train``, ``model_hash``, ``data_hash``, ``sketch_fingerprint``, ``left_out``: trainable
parameters the layer selection leaves out and why) and, only when a mask file is used,
``selective_mask`` (its hash); only for a checkpoint ensemble, ``checkpoints`` (C) and
``checkpoint_hashes`` (each checkpoint's model hash; ``model_hash`` covers them all). The one
reader and writer of the file.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..batching import batch_count
from ..capture import as_checkpoints
from ..errors import GrassIndexError, option, repair_command
from ..fileio import check_regular, read_json
from ..store import SketchStore, writer_lock
from ..store._env import DATA_FILE
from .errors import AttributionError
from .files import (BUILD_FILE, FORMAT_VERSION, MASK_FILE, OUR_FILES, STORE_DIR, jsonable,
                    write_json)
from .generations import store_build
from .records import BuildRecord
from .fingerprints import (MODEL_HASH_TAG, data_hash, hash_json, layer_dims, model_fingerprint,
                           model_hash)

CLAIM_WAIT_S = 30.0  # a worker waits this long for the lock another worker's claim holds


def make_build_record(options, *, model, infos, sketcher, train_data, masks=None) -> dict:
    """build.json for ``options`` (BuildOptions) over this model, data and sketcher."""
    build = dict(format=FORMAT_VERSION, sparsification=options.sparsification,
                 projection=options.projection, seed=options.seed, layers=options.layers,
                 layer_dims=layer_dims(infos), layout=sketcher.layout, dim=sketcher.dim,
                 batch_size=options.batch_size, n_train=len(train_data),
                 model_hash=model_fingerprint(model), data_hash=data_hash(train_data),
                 sketch_fingerprint=sketcher.fingerprint(),
                 # trainable parameters the layer selection leaves out, and why
                 left_out=dict(sketcher.left_out))
    models = as_checkpoints(model)
    if models is not None:  # an ensemble; only recorded then, so other builds' hashes stay
        build["checkpoints"] = len(models)
        build["checkpoint_hashes"] = [model_hash(m) for m in models]
    if masks is not None:  # only recorded when used, so other builds' hashes are unchanged
        build["selective_mask"] = hash_json(masks)
    return build


def hashed_like_recorded(out: Path, build: dict, model) -> dict:
    """``build`` with its model hashes made by the function ``out``'s build.json used: a build
    an older grass-index started records untagged ``legacy_model_hash``es, and resuming it
    must compare like with like (the same model then matches; another still differs)."""
    try:
        old = read_json(Path(out) / BUILD_FILE) if check_regular(Path(out) / BUILD_FILE) else {}
    except (OSError, ValueError, GrassIndexError):  # claim_out_dir reports it
        return build
    like = old.get("model_hash") if isinstance(old, dict) else None
    if not isinstance(like, str) or like.startswith(MODEL_HASH_TAG):
        return build
    build = dict(build, model_hash=model_fingerprint(model, like=like))
    if "checkpoint_hashes" in build:
        build["checkpoint_hashes"] = [model_hash(m, like=like) for m in as_checkpoints(model)]
    return build


def n_batches(build: dict) -> int:
    """``batch_count`` of a build record."""
    return batch_count(build["n_train"], build["batch_size"])


def read_build_record(out: Path, *, missing: str | None = None) -> dict:
    """build.json of ``out`` as a dict, after ``read_build``'s checks (layout in column
    order: indexdir/records.py column_order)."""
    return dict(read_build(out, missing=missing).raw)


def stored_build_record(store, generation: int = 0) -> dict:
    """The sketch store's own record of what its sketches are (the creation record, or a
    living index's record of ``generation``: indexdir/generations.py), checked like
    build.json, its layout in column order."""
    return dict(BuildRecord(store_build(store, generation),
                            f"the build record of {store.path} (generation {generation})").raw)


def read_build(out: Path, *, missing: str | None = None) -> BuildRecord:
    """build.json of ``out`` as the typed record, checked once: every field's type and range,
    and their agreement; ``missing`` is the error message when there is none (default: an
    OSError is raised as is)."""
    bfile = Path(out) / BUILD_FILE
    if missing is not None and not check_regular(bfile):
        raise AttributionError(missing)
    try:
        build = read_json(bfile)
    except ValueError as e:
        raise AttributionError(f"{bfile} is corrupted ({e}); run {repair_command(out)} to "
                               "restore it from the sketch store") from e
    return BuildRecord(build, str(bfile))


def check_directory(path, what: str, fix: str) -> Path:
    """``path``, which the caller named as ``what`` (e.g. "index directory"), is a directory (a
    symlink to one counts: the caller named it); else one line saying what is there — nothing,
    or a file — and ``fix``, never an OSError from a file opened inside it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # (a parent that is a file: not found)
        raise AttributionError(f"{what} {path} not found; {fix}") from None
    if not stat.S_ISDIR(mode):
        kind = "a file" if stat.S_ISREG(mode) else "something else"
        raise AttributionError(f"{what} {path} is {kind}, not a directory; {fix}")
    return path


def check_out_dir_free(out: Path) -> None:
    """``out`` is new, empty, or a grass-index build (checked before anything is written)."""
    if out.exists() and not out.is_dir():
        raise AttributionError(f"{option('out', str(out))} is a file; pass a directory")
    if out.is_dir() and not (out / BUILD_FILE).is_file() and any(
            p.name not in OUR_FILES and not p.name.startswith((".", "index-"))
            and p.name != MASK_FILE for p in out.iterdir()):
        raise AttributionError(f"output directory {out} is not empty and is not a grass-index "
                               "build; choose a new or empty directory")


def claim_out_dir_locked(out: Path, build: dict, *, wait_s: float = 0.0):
    """Take the store's writer lock, then claim ``out`` (build.json) while holding it: two
    builds into one new directory cannot both claim it. Returns the held lock, for
    ``SketchStore.create(..., lock=)`` (a worker's claim releases it at once)."""
    check_out_dir_free(out)
    lock = writer_lock(out / STORE_DIR, wait_s=wait_s)
    try:
        claim_out_dir(out, build)
    except BaseException:
        lock.release()
        raise
    return lock


def build_diff(old: dict, build: dict) -> str:
    """Which keys two build records differ in, and the likely cause."""
    diff = sorted(k for k in set(old) | set(build)
                  if jsonable(old.get(k)) != jsonable(build.get(k)))
    if len(diff) > 1 and "sketch_fingerprint" in diff:  # derived: name the cause only
        diff.remove("sketch_fingerprint")
    hint = ""
    if diff and all(k not in old for k in diff):  # keys this version records, that one did not
        hint = (" (it was started by an earlier grass-index version, whose build record lacks "
                "them; its sketches cannot be resumed by this one)")
    elif "model_hash" in diff:
        hint = " (the model's weights differ)"
    elif "data_hash" in diff or "n_train" in diff:
        hint = " (the training data differs)"
    return f"differs in: {', '.join(diff)}){hint}"


def claim_out_dir(out: Path, build: dict) -> None:
    """Refuse a directory holding something else; record what this build's sketches mean.
    Builds call it under the store's writer lock (``claim_out_dir_locked``)."""
    bfile = out / BUILD_FILE
    check_out_dir_free(out)
    if bfile.is_file():
        old = read_build_record(out)
        if jsonable(old) != jsonable(build):
            raise AttributionError(
                f"output directory {out} holds a different build ({build_diff(old, build)}; "
                f"choose another {option('out')} or delete {out} to rebuild")
        return
    if (out / STORE_DIR / DATA_FILE).exists():  # build.json lost: the store's own record
        try:
            with SketchStore.open(out / STORE_DIR, readonly=True) as st:
                created = st.meta
        except Exception as e:
            raise AttributionError(f"{out} has sketches but no {BUILD_FILE}, and its store is "
                                   f"unreadable ({e}); delete {out} and rebuild") from e
        if jsonable(created) != jsonable(build):
            raise AttributionError(
                f"output directory {out} holds a different build ({build_diff(created, build)}"
                f"; choose another {option('out')} or delete {out} to rebuild")
    out.mkdir(parents=True, exist_ok=True)
    write_json(bfile, build)


def sketched_batches(path: Path) -> tuple[int, int] | None:
    """(batches committed, batches in all) of a build in ``path``, read while it may still be
    running; None when there is no readable build record or store."""
    try:
        build = read_build_record(path)
        with SketchStore.open(Path(path) / STORE_DIR, readonly=True) as st:
            return st.committed_blocks, n_batches(build)
    except Exception:
        return None
