"""The query side of a finished index: check that a model fits it, sketch query examples
exactly as the training examples were sketched, and open what scoring reads (the sketch store,
the preconditioner, the FAISS index) with errors that say how to repair a damaged part."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..capture import (CaptureError, EnsembleSketcher, GradientSketcher, as_checkpoints,
                       select_layers)
from ..capture.ensemble import single_model, split_block
from ..compress import load_selective_mask
from ..errors import repair_command
from ..fileio import check_regular
from ..index import FaissIndexError, SketchedIndex
from ..precondition import DampingError, Preconditioner, has_preconditioner
from ..precondition import load_preconditioner as load_stored_preconditioner
from ..store import SketchStore, StoreError
from ..signature import item_signature, signature_mismatch
from ..calls import default_collate
from ..indexdir.errors import AttributionError
from ..indexdir.files import MASK_FILE, STORE_DIR
from ..indexdir.records import IndexRecord
from ..indexdir.fingerprints import layer_dims, model_hash
from ..devices import check_device
from ..index.store_scan import StoreScan, checked_queries, raw_rerank
from ..indexdir.files import saturated_name
from ..indexdir.stored import load_faiss, store_rerank
from ..batching import batch_len, batches
from ..indexdir.stored import chunks, preconditioned_blocks

log = logging.getLogger("grass_index")


def _layers(record: IndexRecord) -> list[str] | None:
    return None if record.layers is None else list(record.layers)


def query_models(path: Path, record: IndexRecord, model) -> list[torch.nn.Module]:
    """The models queries are sketched with: ``[model]`` for a single-model index, the C
    checkpoints (a list, in build order) for an ensemble; a count that differs is an error."""
    want = record.checkpoints
    try:
        models = as_checkpoints(model)
    except CaptureError as e:
        raise AttributionError(f"{e}; pass the model index {path} was built from") from e
    got = 1 if models is None else len(models)
    if got != want:
        need = (f"the list of its {want} checkpoints (the task's checkpoints(), in build order)"
                if want > 1 else "the one model it was built from")
        raise AttributionError(f"index {path} was built from {want} checkpoint(s) but "
                               f"{got} model(s) were given; pass {need}")
    return models or [single_model(model)]


def check_model(path: Path, record: IndexRecord, model):
    """The model must have the layers (names and shapes) the index was built on; for an
    ensemble, every checkpoint (a list of models). Returns the (first) model's layers."""
    models = query_models(path, record, model)
    hashes = record.checkpoint_hashes or [record.model_hash]
    found = []
    for c, m in enumerate(models):
        which = f"checkpoint {c}: " if len(models) > 1 else ""
        try:
            infos = _check_one_model(path, record, m)
        except AttributionError as e:
            if not which:
                raise
            raise AttributionError(f"{which}{e}") from e
        found.append(infos)
        recorded = hashes[c] if c < len(hashes) else None
        if model_hash(m, like=recorded) != recorded:  # with the function the index used
            log.warning("%sthe model's weights differ from the ones index %s was built with; "
                        "scores mix two models", which, path)
    return found[0]


def _check_one_model(path: Path, record: IndexRecord, model: torch.nn.Module):
    """One model's layers against the index's (names and shapes)."""
    try:
        infos = select_layers(model, _layers(record))
    except CaptureError as e:
        raise AttributionError(f"the model does not fit index {path}: {e}") from e
    got = {d["name"]: d for d in layer_dims(infos)}
    want = {d["name"]: dict(d) for d in record.layer_dims}
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            raise AttributionError(f"the model has no layer {name!r}, which index {path} "
                                   "was built on; query with the model the index was built "
                                   "from")
        if g != w:
            dims = lambda d: (f"{d['kind']} d_in={d['d_in']} d_out={d['d_out']} "  # noqa: E731
                              f"bias={d['has_bias']} numel={d['numel']}")
            raise AttributionError(f"layer {name!r} of the model is {dims(g)} but index "
                                   f"{path} was built with {dims(w)}; query with the model "
                                   "the index was built from")
    extra = sorted(set(got) - set(want))
    if extra:
        raise AttributionError(f"the model has layers {extra} that index {path} does not "
                               "have; query with the model the index was built from")
    return infos


def query_sketcher(path: Path, record: IndexRecord, model, device=None):
    """A sketcher for ``model`` (an ensemble: its checkpoints) that draws the projections the
    index was built with. Its sketches are what the store holds (no 1/C)."""
    check_device(device)
    check_model(path, record, model)
    models = query_models(path, record, model)
    if record.selective_mask:
        check_regular(path / MASK_FILE)  # the file rule: never through a symlink or a FIFO
    masks = load_selective_mask(path / MASK_FILE) if record.selective_mask else None
    described = record.layers_described
    sketchers = []
    for c, m in enumerate(models):
        if len(models) == 1:
            routes = {n: d.get("capture") for n, d in described.items()}
        else:  # an ensemble describes each checkpoint's layers as c{c}/{layer}
            routes = {split_block(n)[1]: d.get("capture") for n, d in described.items()
                      if split_block(n)[0] == c}
        sketchers.append(GradientSketcher(m, select_layers(m, _layers(record)),
                                          sparsification=record.sparsification,
                                          projection=record.projection, seed=record.seed,
                                          clamp=True, device=device, selective_masks=masks,
                                          routes=routes))
    sk = sketchers[0] if len(sketchers) == 1 else EnsembleSketcher(sketchers)
    layout = dict(record.layout)
    if [(k, int(v)) for k, v in sk.layout.items()] != list(layout.items()):  # order too
        raise AttributionError(f"this grass-index builds sketches of layout {sk.layout} for "
                               f"config {record.sparsification}/"
                               f"{record.projection}, but the index has {layout}; "
                               "rebuild the index with this version")
    built_with = record.sketch_fingerprint
    if built_with is not None and sk.fingerprint() != built_with:
        raise AttributionError(
            f"the projections drawn now for {record.sparsification}/"
            f"{record.projection} (seed {record.seed}) differ from the ones "
            f"the index was built with (fingerprint {sk.fingerprint()} vs {built_with}): "
            "queries would be sketched differently from the training examples. Rebuild the "
            "index with this grass-index version, or query with the version that built it")
    return sk


def sketch_queries(path: Path, record: IndexRecord, model, examples: Sequence, loss_fn, *,
                   collate=None, batch_size: int | None = None, device=None,
                   sketcher: GradientSketcher | None = None) -> torch.Tensor:
    """Raw sketches g(z) [n, K] of the query examples (not preconditioned); for an ensemble of
    C checkpoints, the concatenation over checkpoints of g_c(z), divided by C.

    ``sketcher`` is one made by ``query_sketcher`` for this model, reused across calls by a
    long-lived caller (the server): checking the model and drawing the projections then
    happens once instead of per call (on GPT-2 small the model check alone hashes 0.5 GB)."""
    if not (hasattr(examples, "__len__") and hasattr(examples, "__getitem__")):
        raise AttributionError("examples must be an indexable sequence of items like "
                               "train_data[i]")
    if len(examples) == 0:
        return torch.zeros(0, record.dim)
    want = record.item_signature
    if want is not None:
        for i in range(len(examples)):
            msg = signature_mismatch(want, item_signature(examples[i]), f"query example {i}")
            if msg:
                raise AttributionError(f"{msg}; query examples must look like the training "
                                       "examples")
    for m in query_models(path, record, model):
        m.eval()
    sk = sketcher if sketcher is not None else query_sketcher(path, record, model, device)
    collate = collate or default_collate
    out = []
    for b, lo, batch in batches(examples, batch_size or record.batch_size, collate,
                                what="query examples"):
        try:
            out.append(sk.sketch(batch, loss_fn))
        except CaptureError as e:
            if e.example is not None:
                raise AttributionError(f"query example {lo + e.example}: {e}") from e
            raise AttributionError(f"query examples: {e}") from e
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise AttributionError(f"the loss failed on query examples {lo}..."
                                   f"{lo + batch_len(batch) - 1} ({type(e).__name__}: {e}); are "
                                   "they shaped and typed like the training examples?") from e
    q = torch.cat(out)
    C = record.checkpoints
    # an ensemble scores by the MEAN over checkpoints: 1/C once, on the query side, so every
    # inner product with the stored training vectors (FAISS, re-rank, score) is averaged
    return q / C if C > 1 else q


@contextlib.contextmanager
def reading_store(path: Path):
    """The sketch store of index ``path``, opened only for the duration of one operation (so a
    writer in this process, e.g. reprecondition on another handle, is never blocked by an idle
    reader)."""
    try:
        store = SketchStore.open(Path(path) / STORE_DIR, readonly=True)
    except StoreError as e:
        raise AttributionError(f"cannot open the sketch store of {path}: {e}") from e
    try:
        yield store
    finally:
        store.close()


def open_vector_index(path: Path, record: IndexRecord, *, mmap: bool = True,
                      preconditioner=None):
    """The finished index's FAISS index, checked against the record (file present, readable,
    one vector per training example) cheaply: the container's lengths, magic and metadata,
    the build key, count and ids, but not the checksum over its bytes, which is
    `grass-index verify`'s (like the preconditioner's arrays): on GPT-2 small at n = 4,096 the
    CRC alone was 3.9 of a query's 8.0 s spent opening its 3.2 GB exact index, and reading
    it into memory 3.8 s more, against 0.4 s memory-mapped (benchmarks/query_open.py).
    An exact index held in the store (index/store_scan.py) has no file: it scans the store with
    queries preconditioned by ``preconditioner()``."""
    if record.held_in_store:
        return _store_scan(path, record, preconditioner)
    names = record.index_files
    f = path / names[0] if len(names) == 1 else path
    for name in names:
        if not check_regular(path / name):  # a symlink or FIFO there is refused, naming it
            raise AttributionError(f"{path / name} is missing; run {repair_command(path)} to "
                                   "rebuild it from the stored sketches")
    try:
        vindex = load_faiss(path, record, mmap=mmap, verify=False)
    except (FaissIndexError, OSError) as e:
        raise AttributionError(f"{f} is unreadable ({e}); run {repair_command(path)} to "
                               "rebuild it") from e
    if vindex.ntotal != record.n_live:
        raise AttributionError(f"{f} holds {vindex.ntotal} vectors, config says "
                               f"{record.n_live}; run {repair_command(path)}")
    return vindex


def _store_scan(path: Path, record: IndexRecord, preconditioner) -> StoreScan:
    """The exact index of ``record`` scanned from the store of ``path`` (opened per search)."""
    if preconditioner is None:
        preconditioner = lambda: load_preconditioner(path, record)  # noqa: E731
    with reading_store(path) as store:
        try:
            saturated = store.get_array(saturated_name(record.preconditioner_key))
        except (KeyError, StoreError) as e:
            raise AttributionError(f"the exact index of {path} lacks its list of saturated "
                                   f"blocks ({e}); run {repair_command(path)}") from None
    return StoreScan(lambda: reading_store(path), preconditioner, dim=record.dim,
                     live=record.generation.live_mask(), saturated=saturated,
                     build_key=record.preconditioner_key, recall=record.recall)


def load_preconditioner(path: Path, record: IndexRecord) -> Preconditioner:
    """The preconditioner pass 2 stored for this variant, as a query needs it: large arrays
    memory-mapped and checked cheaply (size, header, shape, dtype; `grass-index verify` checks
    their checksums), and the stored sketches its low-rank layers apply through streamed
    block by block for a query's batch, read whole on first use by a larger one (with the store
    opened again then: nothing stays open between operations)."""
    key = record.preconditioner_key

    def rows():  # the rows this generation's low-rank layers were fitted on (removed: not)
        with reading_store(path) as store:  # the block checksums are verify's
            return store.get_rows(record.generation.live_ids(), verify=False)

    live = record.generation.live_mask()

    def blocks():  # the same rows, streamed: (position among them, rows)
        with reading_store(path) as store:
            seen = 0
            for start, got in store.iter_blocks(verify=False):
                if start >= len(live):
                    break
                got = got[:len(live) - start][live[start:start + len(got)]]
                yield seen, got
                seen += len(got)
    with reading_store(path) as store:
        if not has_preconditioner(store, key):
            raise AttributionError(f"the preconditioner is missing from {path}; run "
                                   f"{repair_command(path)}")
        try:
            return load_stored_preconditioner(store, key, dict(record.layout), mapped=True,
                                              rows=rows, blocks=blocks)
        except KeyError as e:  # deleted after the check: a re-precondition replaced it
            raise AttributionError(f"the preconditioner of {path} is incomplete ({e}); run "
                                   f"{repair_command(path)}") from None


def search(path: Path, vindex, preconditioner, queries, k: int, *, opponents: bool = False,
           nprobe: int | None = None):
    """``_search``, a damping that takes a query out of float32 (an index that preconditions
    its queries: index/store_scan.py) reported as the index's problem, with the fix."""
    try:
        return _search(path, vindex, preconditioner, queries, k, opponents=opponents,
                       nprobe=nprobe)
    except DampingError as e:
        raise AttributionError(str(e)) from None


def _search(path: Path, vindex, preconditioner, queries, k: int, *, opponents: bool = False,
            nprobe: int | None = None):
    """Top-k (scores, ids) of raw query sketches [n, K]. A two-stage index (a search sketch in
    FAISS) re-ranks its candidates exactly from the stored sketches; ``preconditioner`` is
    called only then."""
    if isinstance(vindex, SketchedIndex):
        pre = preconditioner()
        with reading_store(path) as store:
            if vindex.raw_rows:  # FAISS holds sketches of the raw rows: precondition the query
                try:
                    saturated = store.get_array(saturated_name(vindex.build_key))
                except (KeyError, StoreError) as e:
                    raise AttributionError(f"the search sketch of {path} lacks its list of "
                                           f"saturated blocks ({e}); run "
                                           f"{repair_command(path)}") from None
                searched = vindex.with_rerank(raw_rerank(store, pre.layout, saturated),
                                              lambda q: checked_queries(pre, q, vindex.dim))
            else:
                searched = vindex.with_rerank(store_rerank(store, pre))
            return searched.search(queries, k, opponents=opponents, nprobe=nprobe)
    return vindex.search(queries, k, opponents=opponents, nprobe=nprobe)


def train_vectors(path: Path, pre: Preconditioner, limit: int | None = None):
    """Yield (start_id, preconditioned rows) from the stored sketches, in id order (ids below
    ``limit``: the generation's rows; an add may be storing more)."""
    with reading_store(path) as store:
        yield from preconditioned_blocks(store, pre, limit=limit)


def raw_sketches(path: Path, limit: int | None = None):
    """Yield (start_id, raw rows ĝ_i [B, K] float32) from the stored sketches, in id order
    (ids below ``limit``)."""
    with reading_store(path) as store:
        yield from chunks(store, limit=limit)
