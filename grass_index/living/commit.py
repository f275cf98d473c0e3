"""Committing the next generation of a living index, the same way a build commits: the
store's record of the new generation first, then pass 2 over the rows that count (new
preconditioner and FAISS files under a new key, beside the old ones), then config.json — the
commit point — then build.json and the clean-up of the old generation's files.

Until config.json is replaced, every reader (and a kill -9) sees the old generation whole:
its config.json, its FAISS file(s) and preconditioner arrays are untouched, and the rows it
reads (ids below its n_train) never change. Re-running the same change resumes it (pass 2
finds the preconditioner the killed run stored under the same key); another change rolls
the killed one back (``grow.py``: rows it stored are truncated; the commit removes its files).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..fileio import write_json
from ..index import FaissIndexError
from ..indexdir.errors import AttributionError
from ..indexdir.files import BUILD_FILE
from ..indexdir.generations import Generation, store_key
from ..indexdir.record import stored_build_record
from ..indexdir.records import IndexRecord
from ..indexdir.stored import load_faiss
from ..pipeline.options import IndexOptions
from ..pipeline.pass2 import finish
from .fisher import update_fisher

log = logging.getLogger("grass_index")


def recorded_build(store, record: IndexRecord) -> dict:
    """The build record of ``record``'s generation as the store keeps it, in column order
    (what pass 2 hashes into its key and config.json's sketch_hash)."""
    return stored_build_record(store, record.generation.number)


def index_options(record: IndexRecord) -> IndexOptions:
    """The recorded pass-2 options: a recorded rule (a relative factor, ``auto``) is applied
    to the new generation's spectrum again; an absolute damping stays the number it was."""
    damping = record.damping
    try:
        damping = float(damping) if damping is not None else None
    except ValueError:
        pass
    return IndexOptions(hessian=record.hessian, damping=damping, index=record.index_kind)


def refuse_ekfac(record: IndexRecord, what: str) -> None:
    if record.hessian == "ekfac":
        raise AttributionError(
            f"cannot {what} an index preconditioned with hessian ekfac (its Kronecker factors "
            "are sums over activations pass 1 kept, not over the stored sketches); "
            "re-precondition it with hessian eFIM first, or rebuild it")


def commit_generation(path: Path, store, record: IndexRecord, build: dict, gen: Generation, *,
                      progress, template=None, task: dict | None = None,
                      options: IndexOptions | None = None) -> dict:
    """Make ``gen`` (over ``build``'s rows) the index's generation; the new config.
    ``task``: the task record of an add ({task, task_sha256}: the grown data's; default the
    recorded one); ``options``: pass 2's (default: the recorded ones)."""
    store.put_meta(store_key(gen.number), build)  # readers of the old generation ignore it
    updated = update_fisher(store, dict(record.layout), record.generation, gen, record.hessian)
    log.info("generation %d: Fisher sums %s", gen.number,
             "updated from the cached ones" if updated else "summed over the rows that count")
    cfg = finish(path, store, build, dict(record.layers_described),
                 options or index_options(record),
                 task=task, progress=progress, old_config=dict(record.raw), again="refit",
                 generation=gen, template=template)
    write_json(path / BUILD_FILE, build)  # after the commit: what the sketches now are
    return cfg


def settle(path: Path) -> None:
    """build.json is the build record of config.json's generation: restored from the store
    when a kill fell between the commit (config.json) and its write. Every change, and a
    build into a finished index, starts here."""
    from ..fileio import read_json
    from ..indexdir.config import read_record
    from ..indexdir.files import STORE_DIR, jsonable
    from ..store import SketchStore, StoreError

    try:
        record = read_record(path)
        with SketchStore.open(Path(path) / STORE_DIR, readonly=False) as store:
            want = recorded_build(store, record)
            try:
                have = read_json(Path(path) / BUILD_FILE)
            except (OSError, ValueError):
                have = None
            if jsonable(have) != jsonable(want):
                log.warning("restoring %s of generation %d (a change was interrupted after "
                            "its commit)", BUILD_FILE, record.generation.number)
                write_json(Path(path) / BUILD_FILE, want)
    except (AttributionError, StoreError, OSError):
        return  # not a finished index, or another writer holds it: nothing to settle here


def kept_quantizer(path: Path, record: IndexRecord, retrain: bool):
    """The template pass 2 fills for a grown IVF index: its trained quantizer, emptied (None:
    train afresh — for --retrain, a flat index, float16 scales or a two-stage index)."""
    if retrain or not record.index_kind.startswith("ivf") or "fp16" in record.index_kind:
        return None
    try:
        vindex = load_faiss(path, record)
    except (FaissIndexError, OSError) as e:
        log.warning("the IVF index of %s is unreadable (%s); training a new quantizer", path, e)
        return None
    first = _ivf_part(vindex, record)
    if first is None:
        return None  # a search sketch of the vectors: its own template
    empty = first.emptied()
    return lambda: empty


def _ivf_part(vindex, record: IndexRecord):
    """The first IVF part of ``vindex`` over the full vectors (its quantizer is every part's),
    or None when the index is not IVF over them (e.g. IVF over a search sketch)."""
    parts = getattr(vindex, "parts", None) or [getattr(vindex, "inner", vindex)]
    first = parts[0]
    if getattr(first, "kind", None) != "ivf" or first.dim != record.dim:
        return None
    return first


def drift(path: Path, cfg: dict, n_old: int, *, sample: int = 512) -> float | None:
    """How far the new rows sit from the kept IVF quantizer, relative to the old rows: the
    ratio of their mean distances to their lists' centroids (None: not an IVF index, or a
    side with no rows)."""
    import numpy as np

    record = IndexRecord(cfg)
    if not record.index_kind.startswith("ivf"):
        return None
    vindex = load_faiss(path, record)
    first = _ivf_part(vindex, record)
    if first is None:
        return None
    live = record.generation.live_ids()
    old, new = live[live < n_old], live[live >= n_old]
    if not len(old) or not len(new):
        return None
    rng = np.random.default_rng(0)
    pick = [rng.choice(ids, min(sample, len(ids)), replace=False) for ids in (old, new)]
    d_old, d_new = (first.centroid_distance(vindex.reconstruct(ids)) for ids in pick)
    return d_new / d_old if d_old > 0 else None
