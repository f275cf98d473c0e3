"""Growing a living index: training data that grew at the end (every earlier example's
fingerprint unchanged, the same model and sketch settings) gets only its new examples
sketched (pass 1 on m rows), then the next generation is committed (commit.py).

The store keeps its block layout — block b holds batch b, examples [b·B, (b+1)·B) — so a
grown index holds the rows a fresh build over all the data would: a short last batch is
filled up in place (``SketchStore.grow_block``: its earlier rows stay bit for bit, so readers
of the old generation read the same ids), then the new full batches are appended.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..batching import batch_count
from ..calls import collate_items
from ..errors import option, spelled
from ..indexdir.config import check_index_dir, read_record
from ..indexdir.errors import AttributionError
from ..fileio import check_dir
from ..indexdir.files import ADDS_DIR, MASK_FILE, STORE_DIR, jsonable
from ..indexdir.fingerprints import block_digest, first_difference
from ..indexdir.record import build_diff
from ..pipeline.options import BuildOptions
from ..pipeline.progress import Progress
from ..pipeline.run import BuildResult, Prepared
from ..pipeline.sketching import _sketch_batch, sketch_training_set
from ..store import SketchStore, StoreError
from .commit import (commit_generation, drift, kept_quantizer, recorded_build, refuse_ekfac,
                     settle)

log = logging.getLogger("grass_index")
GROWN = ("n_train", "data_hash")  # what a build record of grown data may differ in
DRIFT_WARN = 1.5  # new rows this much farther from their IVF centroids than the old: warn


def grows(path, train_data: Sequence) -> bool:
    """``path`` holds a finished index over fewer examples than ``train_data`` (a re-run of
    `build` over data that grew: then only the new examples are sketched)."""
    try:
        record = read_record(Path(path))
    except AttributionError:
        return False
    return hasattr(train_data, "__len__") and len(train_data) > record.n_train


def same_data(path, model, train_data: Sequence, loss_fn, options: BuildOptions, *,
              collate=None, device=None) -> bool:
    """A re-run of `build` over the data of a living index (generation 1 on, as many
    examples): True when its build record is the index's — the sketches are all there and
    its removed examples stay removed, so only pass 2's options may differ; an error naming
    the difference otherwise. False for anything else (a plain build resumes or refits)."""
    try:
        record = read_record(Path(path))
    except AttributionError:
        return False
    if record.generation.number == 0 or not (
            hasattr(train_data, "__len__") and len(train_data) == record.n_train):
        return False  # a plain build's directory: resumed or refitted as usual
    prep = Prepared(model, train_data, loss_fn, options, collate=collate, device=device)
    with SketchStore.open(Path(path) / STORE_DIR, readonly=True) as store:
        old = recorded_build(store, record)
    if jsonable(old) != jsonable(prep.build):
        raise AttributionError(f"output directory {path} holds a different build "
                               f"({build_diff(jsonable(old), jsonable(prep.build))}; choose "
                               f"another {option('out')} or delete {path} to rebuild")
    return True


def grown_at_end(path, model, train_data: Sequence, loss_fn, options: BuildOptions, *,
                 collate=None, device=None) -> bool:
    """``path`` holds a finished index whose training data ``train_data`` extends at the end:
    the same model and sketch settings (``options``), every indexed example unchanged — what
    an add grows, and what a build there (e.g. one worker's share) would refuse as a different
    build. An index `add` refuses (EK-FAC) is refused here, naming why."""
    if not grows(path, train_data):
        return False
    path = Path(path)
    record = read_record(path)
    prep = Prepared(model, train_data, loss_fn, options, collate=collate, device=device)
    try:
        with SketchStore.open(path / STORE_DIR, readonly=True) as store:
            check_indexed(path, store, record, prep, train_data)  # every indexed example
    except (AttributionError, StoreError):
        return False  # other data or settings (a different build), or a store to repair
    refuse_ekfac(record, "add examples to")
    return True


def add_in_process(path, model, train_data: Sequence, loss_fn, *, collate=None,
                   progress=True, device=None, retrain: bool = False,
                   workers: int | None = None, task: dict | None = None,
                   options=None) -> BuildResult:
    """Sketch the examples ``train_data`` has beyond the index in ``path`` (its earlier ones
    must be the indexed ones, unchanged) in this process and commit the next generation.
    ``retrain``: train a new IVF quantizer instead of keeping the index's; ``task``: the
    task's record ({task, task_sha256}) for config.json (default: the recorded one);
    ``options``: IndexOptions for pass 2 (a re-run of `build` with other ones; default: the
    recorded hessian, damping rule and index kind). (``workers.add_examples`` is the entry
    point: it sends a torchrun add to its ranks.)"""
    path = check_index_dir(path)  # a file or nothing there: one line, not an OSError
    settle(path)
    refuse_split_add(path)
    record, prep = prepare(path, model, train_data, loss_fn, collate=collate, device=device,
                           workers=workers)
    n = len(train_data)
    prog = Progress(progress)
    try:
        with SketchStore.open(path / STORE_DIR, readonly=False) as store:
            record = read_record(path)  # under the writer lock: the generation we extend
            old = recorded_build(store, record)
            _check_same_build(path, old, prep.build)
            n_old = record.n_train
            prog.note(f"index {path} holds {n_old} examples; sketching only the {n - n_old} "
                      "new one(s)")
            _pass1(store, prep, train_data, n_old, prog)
            cfg = commit_grown(path, store, record, jsonable(prep.build), n - n_old,
                               progress=prog, task=task, options=options, retrain=retrain)
    finally:
        prog.close()
    warn_drift(path, cfg, n_old, retrain)
    return BuildResult(path, cfg)


def prepare(path: Path, model, train_data: Sequence, loss_fn, *, collate, device,
            workers: int | None) -> tuple:
    """(the index's record, pass 1's checked inputs with the recorded sketch settings) for
    growing ``path`` by the examples ``train_data`` has beyond it."""
    record = read_record(path)
    refuse_ekfac(record, "add examples to")
    n_old, n = record.n_train, len(train_data) if hasattr(train_data, "__len__") else -1
    if n <= n_old:
        raise AttributionError(f"the training data has {n} examples and index {path} already "
                               f"holds {n_old}: nothing to add (new examples go at the end)")
    sketching = BuildOptions(sparsification=record.sparsification, projection=record.projection,
                             seed=record.seed, layers=list(record.layers or []) or None,
                             batch_size=record.batch_size, workers=workers,
                             selective_mask=path / MASK_FILE if record.selective_mask else None)
    return record, Prepared(model, train_data, loss_fn, sketching, collate=collate,
                            device=device)


def commit_grown(path: Path, store, record, build: dict, n_new: int, *, progress, task,
                 options, retrain: bool) -> dict:
    """Commit the generation that grows ``record``'s by the ``n_new`` rows just stored (one
    process's add and a split add's merge alike): the IVF quantizer kept unless ``retrain``
    or another index kind was asked for."""
    return commit_generation(path, store, record, build, record.generation.grown(n_new),
                             progress=progress, task=task, options=options,
                             template=kept_quantizer(path, record, retrain or (
                                 options is not None and options.index != record.index_kind)))


def merge_command(path) -> str:
    """The merge of ``path``'s add shards as the caller runs it."""
    return spelled(f"`grass-index merge {path}`", f"merge_shards({str(path)!r})")


def warn_drift(path: Path, cfg: dict, n_old: int, retrain: bool) -> None:
    """Warn when the new rows lie far from a kept IVF quantizer's centroids."""
    ratio = drift(path, cfg, n_old) if not retrain else None
    if ratio is not None and ratio > DRIFT_WARN:
        log.warning("the new examples lie %.1fx farther from the IVF index's centroids than "
                    "the old ones (quantizer trained on the first generation): recall may drop; "
                    "add with %s to train a new one", ratio,
                    spelled("--retrain", "retrain=True"))


def refuse_split_add(path: Path) -> None:
    """An add in one process while `add --worker I/N` shards wait for their merge would
    sketch the same examples twice: one line naming both ways on."""
    shards = path / ADDS_DIR
    if check_dir(shards) and any(not p.name.startswith(".") for p in shards.iterdir()):
        raise AttributionError(
            f"{shards} holds the shards of a split add; finish it with {merge_command(path)}"
            f", or delete {shards} to add in one process")


def check_indexed(path: Path, store, record, prep, data: Sequence, first: int = 0,
                  step: int = 1) -> None:
    """``prep`` is the index's build, and the indexed examples of batches first,
    first + step, ... are unchanged (their stored fingerprints); an error names the
    difference."""
    _check_same_build(path, recorded_build(store, record), prep.build)
    for j in range(first, batch_count(record.n_train, prep.batch_size), step):
        _check_block(store, data, j, prep.batch_size, upto=record.n_train)


def _check_same_build(path: Path, old: dict, new: dict) -> None:
    """The grown data's build record may differ from the index's in n_train and data_hash
    only (the same model, layers, specs, seed and batch size)."""
    a = {k: v for k, v in jsonable(old).items() if k not in GROWN}
    b = {k: v for k, v in jsonable(new).items() if k not in GROWN}
    if a != b:
        raise AttributionError(f"index {path} was built differently ({build_diff(a, b)}; only "
                               "training data that grew at the end can be added: the same "
                               "model, layers and settings. Build a new index instead")


def _pass1(store, prep, data: Sequence, n_old: int, progress) -> None:
    """Pass 1 on the new rows: rows a killed add stored for other data are rolled back, a
    short last batch is filled up in place, the remaining batches appended."""
    B = prep.batch_size
    if store.num_rows > n_old and not _pending_matches(store, data, n_old, B):
        log.warning("rolling back %d row(s) an interrupted add stored for other data",
                    store.num_rows - n_old)
        store.truncate(n_old, B)
    _check_block(store, data, (n_old - 1) // B, B, upto=n_old)  # the old last batch
    rows_now = store.num_rows
    if rows_now % B and rows_now < len(data):  # a short last batch: fill it up
        j, hi = rows_now // B, min(len(data), (rows_now // B + 1) * B)
        items = [data[i] for i in range(rows_now, hi)]
        batch = collate_items(prep.collate, items, f"training examples {rows_now}..{hi - 1}")
        rows = _sketch_batch(prep.sketcher, batch, prep.loss_fn, rows_now, hi, j).numpy()
        store.grow_block(j, rows, digest=block_digest(items))
    sketch_training_set(store, prep.sketcher, data, prep.loss_fn, batch_size=B,
                        collate=prep.collate, progress=progress, workers=prep.workers)


def _pending_matches(store, data: Sequence, n_old: int, B: int) -> bool:
    """Rows beyond ``n_old`` (a killed add) are these data's examples: resume, don't redo."""
    if store.num_rows > len(data):
        return False
    try:
        for j in range(n_old // B, store.committed_blocks):
            _check_block(store, data, j, B)
    except AttributionError:
        return False
    return True


def _check_block(store, data: Sequence, j: int, B: int, upto: int | None = None) -> None:
    """Block ``j``'s stored fingerprints equal the examples' now (those below ``upto``)."""
    stored = store.block_digest(j)
    if stored is None or j < 0:
        return
    lo = j * B
    hi = min(len(data), (j + 1) * B, store.num_rows if upto is None else upto)
    k = first_difference(stored[:len(stored) - 16 * (max(0, _rows_in(store, j) - (hi - lo)))],
                         block_digest(data[i] for i in range(lo, hi)))
    if k is not None:
        raise AttributionError(
            f"training example {lo + k} differs from the one indexed in {store.path}: only "
            "data that grew at the end can be added (every earlier example unchanged); build "
            "a new index over the changed data")


def _rows_in(store, j: int) -> int:
    """Rows block ``j`` holds (every block is a full batch but the last)."""
    B = store.meta.get("batch_size") or 1
    return min(B, store.num_rows - j * B)
