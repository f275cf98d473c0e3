"""Pass 2: Fisher from the stored sketches -> preconditioner -> FAISS -> config.json.

Pass 2 reads pass 1's blocks back, so changing the damping or the Hessian never recomputes a
gradient (``_refit``).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..index import (ExactTopK, SearchSketch, ShardedIndex, SketchedIndex, VectorIndex,
                     default_search_sketch, parse_spec, part_ranges, recall_at_k)
from ..precondition import (ChunkedFisher, FisherAccumulator, Preconditioner, dense_layers,
                            load_preconditioner, save_preconditioner,
                            stale_preconditioner_arrays)
from ..store import SketchStore, StoreError
from .config import _damping_key
from .errors import AttributionError
from .files import BUILD_FILE, CONFIG_FILE, STORE_DIR, _jsonable, _write_json
from .fingerprints import _data_signature, _hash, config_hash
from .progress import _Progress
from .stored import _preconditioned_blocks

log = logging.getLogger("grass_index")


def _finish(out: Path, store, build: dict, describe: dict, *, hessian: str, damping,
            index: str, nlist, nprobe, task, progress, data=None, old_config=None,
            fisher: ChunkedFisher | None = None) -> dict:
    """Pass 2: Fisher from stored sketches -> preconditioner -> FAISS -> config.json.
    ``fisher``: the sums pass 1 accumulated (:func:`pass1_fisher`), so the store is not re-read."""
    n, layout = build["n_train"], build["layout"]
    index = str(parse_spec(index))  # canonical: the same index under any spelling
    n_blocks = math.ceil(n / build["batch_size"])
    if store.committed_blocks < n_blocks:
        raise AttributionError(f"only {store.committed_blocks} of {n_blocks} batches are "
                               "sketched; re-run the build to finish pass 1")
    key = _pass2_key(build, hessian=hessian, damping=damping, index=index, nlist=nlist,
                     nprobe=nprobe)
    pre = _stored_preconditioner(store, key, layout)  # a resumed pass 2 reuses the inverses
    if pre is None:
        pre = _fit(store, layout, hessian, damping, progress, fisher)
        save_preconditioner(store, key, pre)

    parts, vindex = _build_faiss(store, pre, build, index, nlist, nprobe, progress)
    names = index_file_names(key, len(parts))
    _remove_temp_files(out)
    for part, name in zip(parts, names):
        part.save(out / name)
    item_signature = (_data_signature(data) if data is not None
                      else (old_config or {}).get("item_signature"))
    return _commit(out, store, build, describe, pre=pre, key=key, vindex=vindex,
                   index=index, index_files=names, hessian=hessian, damping=damping,
                   task=task if task is not None else (old_config or {}).get("task"),
                   item_signature=item_signature, progress=progress)


def _pass2_key(build: dict, *, hessian, damping, index, nlist, nprobe) -> str:
    """Names this pass 2's preconditioner and index files (a variant of the same sketches)."""
    return _hash(dict(hessian=hessian, damping=_damping_key(damping), index=index, nlist=nlist,
                      nprobe=nprobe, sketch=_hash(build)))[:12]


def index_file_names(key: str, parts: int) -> list[str]:
    return ([f"index-{key}.faiss"] if parts == 1 else
            [f"index-{key}-{i}-of-{parts}.faiss" for i in range(parts)])


def _remove_temp_files(out: Path) -> None:
    """Temp files of a writer killed mid-save (an index can be GBs). Only called while holding
    the store's writer lock, so no live process is writing any of them."""
    for p in [*out.glob("index-*.faiss.tmp-*"), *out.glob(f".{CONFIG_FILE}.tmp*")]:
        p.unlink(missing_ok=True)


def _commit(out: Path, store, build: dict, describe: dict, *, pre, key: str, vindex,
            index: str, index_files: list[str], hessian: str, damping, task,
            item_signature, progress) -> dict:
    """Write config.json — the commit point of the whole build — then drop older variants."""
    cfg = dict(build)
    cfg.update(
        library="grass-index", version=__version__, torch=torch.__version__, task=task,
        hessian=hessian, damping=_damping_key(damping), damping_used=pre.damping_used,
        preconditioner=_jsonable(pre.describe()), preconditioner_key=key,
        layers_described=describe, index=_jsonable(vindex.describe()), index_kind=index,
        index_file=index_files[0], index_files=index_files,
        n_blocks=math.ceil(build["n_train"] / build["batch_size"]),
        sketch_hash=_hash(build), item_signature=item_signature,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    cfg = _jsonable(cfg)
    cfg["config_hash"] = config_hash(cfg)
    store.put_meta("config", cfg)
    _write_json(out / CONFIG_FILE, cfg)  # the commit point of the whole build
    for p in out.glob("index-*.faiss"):  # older preconditioning variants
        if p.name not in index_files:
            p.unlink(missing_ok=True)
    for name in stale_preconditioner_arrays(store.array_names(), key):  # theirs (k×k per layer)
        store.delete_array(name)
    progress("done", 1, 1)
    return cfg


def _refit(path: Path, config: dict, *, hessian: str, damping, index: str,
           progress=False) -> dict:
    """Pass 2 again over a finished index's stored sketches (another damping, Hessian or
    index kind); the new config. ``hessian`` is canonical and ``damping`` already checked."""
    build = json.loads((path / BUILD_FILE).read_text())
    prog = _Progress(progress)
    try:
        with SketchStore.open(path / STORE_DIR, readonly=False) as store:
            return _finish(path, store, build, config.get("layers_described", {}),
                           hessian=hessian, damping=damping, index=index, nlist=None,
                           nprobe=None, task=None, progress=prog, old_config=config)
    finally:
        prog.close()


def _stored_preconditioner(store, key: str, layout: dict):
    """The preconditioner pass 2 already stored under ``key``, or None when there is none or it
    is damaged (non-finite, unreadable): then it is fitted again from the cached Fisher."""
    name = f"precond/{key}"
    try:
        pre = load_preconditioner(store, key, layout)
    except KeyError:
        return None
    except (StoreError, ValueError) as e:
        log.warning("stored preconditioner %s is unreadable (%s); refitting it", name, e)
        return None
    state = pre.state_dict()
    if not all(np.isfinite(v).all() for v in state.values() if np.asarray(v).dtype.kind == "f"):
        log.warning("stored preconditioner %s has NaN/inf entries; refitting it", name)
        return None
    return pre


# --- streaming Fisher -> preconditioner (one set of k×k sums at most) ---------------------

def pass1_fisher(store, layout, hessian: str, n: int) -> ChunkedFisher | None:
    """The accumulator pass 1 feeds (every sketch is in hand there, so pass 2 need not re-read
    the store), or None when pass 2 needs no dense Fisher (identity; all layers low-rank) or
    finds it cached."""
    dense = dense_layers(layout, n)
    if hessian != "eFIM" or not dense or _has_fisher(store, dense):
        return None
    return ChunkedFisher(layout, only=dense)


def _fit(store, layout, hessian: str, damping, progress, fisher: ChunkedFisher | None):
    """The preconditioner, one layer at a time: layers with n < k/2 by Woodbury from the stored
    rows, the others from Σ ĝĝᵀ — pass 1's sums, the cached Fisher, or a re-read of the store
    — cached as each is taken, then factored in place."""
    if hessian != "eFIM":
        return Preconditioner.fit({}, layout, hessian=hessian)
    n = store.num_rows
    dense = dense_layers(layout, n)
    if fisher is not None and fisher.next_id != n:  # pass 1 had nothing left to sketch
        fisher = None
    tick = lambda done, total: progress("fisher", done, total)  # noqa: E731
    rows = lambda: store.get_rows(np.arange(n))  # noqa: E731  (only when n < k/2: small)
    if dense and fisher is None and _has_fisher(store, dense):
        def take(name):
            return np.array(store.get_array(f"fisher/{name}"), dtype=np.float64)
        return Preconditioner.fit_layers(layout, damping=damping, n=n, take_fisher=take,
                                         rows=rows, progress=tick)
    acc = None
    if dense:
        acc = fisher.finish() if fisher is not None else _accumulate(
            store, layout, lambda done: progress("fisher", done, n), only=dense)
        if acc.n != n:
            raise AttributionError(f"the Fisher sums cover {acc.n} rows but the store holds "
                                   f"{n}; re-run the build")
        store.put_meta("fisher_done", False)

    def take_and_cache(name):
        f = acc.take_sum(name)
        f /= n
        store.put_array(f"fisher/{name}", f)
        return f
    pre = Preconditioner.fit_layers(layout, damping=damping, n=n, rows=rows, progress=tick,
                                    take_fisher=take_and_cache if acc is not None else None)
    if acc is not None:
        store.put_meta("fisher_n", int(n))
        store.put_meta("fisher_done", True)  # last: a pass killed half-way recomputes
    return pre


def _has_fisher(store, layout) -> bool:
    return bool(store.get_meta("fisher_done", False)) and all(
        store.has_array(f"fisher/{k}") for k in layout)


def _accumulate(store, layout, progress=None, only=None) -> FisherAccumulator:
    """Σ ĝĝᵀ and n over every row of a store, in id order (the chunks pass 1 would use)."""
    acc = ChunkedFisher(layout, only=only)
    for start, rows in store.iter_blocks():
        acc.add(start, rows)
        if progress is not None:
            progress(acc.next_id)
    return acc.finish()


def _put_fisher(store, acc) -> None:
    """Cache F_l (e.g. summed from shards) where pass 2 looks first, one layer at a time; the
    flag goes last, so a pass killed half-way recomputes instead of trusting a partial cache."""
    for k in acc.names:
        store.put_array(f"fisher/{k}", acc.fisher(k))
    store.put_meta("fisher_n", int(acc.n))
    store.put_meta("fisher_done", True)


RECALL_QUERIES, RECALL_K = 100, 10
IVF_TRAIN_CAP = 100_000


def _build_faiss(store, pre, build, spec, nlist, nprobe, progress):
    """The FAISS index over the preconditioned sketches — its parts (one per ``shards``, each
    a contiguous id range) and the index searching them as one — with its measured
    recall@10, recorded in every part."""
    spec = parse_spec(spec)
    n = build["n_train"]
    sk = search_sketch(spec, build["dim"], build["seed"])  # -- two-stage search (wide K) --
    blocks = _preconditioned_blocks(store, pre)
    template = _template(blocks if sk is None else ((s, sk(v)) for s, v in blocks), spec,
                         build["dim"] if sk is None else sk.dim, nlist, nprobe)
    ranges = part_ranges(n, spec.shards)
    parts = [template.empty_like() for _ in ranges]
    if sk is not None:
        parts = [SketchedIndex(p, sk, spec.rerank) for p in parts]
    qids, k = recall_queries(n)
    exact = ExactTopK(store.get_rows(qids), k + 1) if k >= 1 else None
    for start, vec in _preconditioned_blocks(store, pre):
        ids = np.arange(start, start + len(vec), dtype=np.int64)
        for part, (lo, hi) in zip(parts, ranges):
            mine = (ids >= lo) & (ids < hi)
            if mine.any():
                part.add(vec[mine], ids[mine])
        if exact is not None:
            exact.add(vec, ids)
        progress("index", start + len(vec), n)
    if sk is None:
        vindex = parts[0] if len(parts) == 1 else ShardedIndex(parts)
    else:
        vindex = parts[0] if len(parts) == 1 else SketchedIndex(
            ShardedIndex([p.inner for p in parts]), sk, spec.rerank)
        vindex = vindex.with_rerank(store_rerank(store, pre))
    _check_count(vindex, n)
    if exact is not None:
        _measure_recall(vindex, exact, qids, k, others=parts)
    return parts, vindex


def search_sketch(spec, K: int, seed: int) -> SearchSketch | None:
    """The search sketch an index spec asks for over K-wide vectors (by default: one when K is
    large, see grass_index/index/search_sketch.py), or None for exact FAISS search."""
    dim = default_search_sketch(K) if spec.sketch < 0 else spec.sketch
    return None if not dim or dim >= K else SearchSketch(K, dim, seed)


def store_rerank(store, pre):
    """Exact scores of candidate ids: ⟨(F+λI)^{-1} q, ĝ_i⟩ from the stored raw rows (the
    inverse is symmetric, so preconditioning the query once equals preconditioning each row).
    Candidate rows are read without re-checking their block checksums (a query reads R·k rows,
    each from a block of batch_size rows); `grass-index verify` checks every block."""
    def rerank(queries, ids):
        pq = pre.apply(queries)
        out = np.empty(ids.shape, np.float32)
        for r in range(len(ids)):
            out[r] = store.get_rows(ids[r], verify=False) @ pq[r]
        return out
    return rerank


def _template(blocks, spec, dim: int, nlist, nprobe) -> VectorIndex:
    """An empty index that the parts are copied from: IVF trained on (and float16 scales fixed
    by) the first preconditioned rows ``blocks`` yields — a deterministic sample."""
    template = VectorIndex.create(dim, spec.kind, nlist=nlist, nprobe=nprobe, dtype=spec.dtype)
    if spec.kind == "ivf" or spec.dtype == "float16":
        sample, got = [], 0
        for _, vec in blocks:
            sample.append(vec)
            got += len(vec)
            if spec.kind == "flat" or got >= IVF_TRAIN_CAP:
                break
        sample = np.concatenate(sample)[:IVF_TRAIN_CAP]
        if spec.kind == "ivf":
            template.train(sample)
        template.fix_scales(sample)
    return template


def recall_queries(n: int) -> tuple[np.ndarray, int]:
    """Recall ground truth uses training sketches as queries (the distribution of real queries'
    sketches), each one's own id excluded from both lists: (their ids, k)."""
    k = min(RECALL_K, n - 1)
    return np.unique(np.linspace(0, n - 1, min(RECALL_QUERIES, n)).round().astype(np.int64)), k


def _check_count(vindex, n: int) -> None:
    if vindex.ntotal != n:
        raise AttributionError(f"index holds {vindex.ntotal} vectors for {n} "
                               "training examples; the sketch store is inconsistent — run "
                               "grass-index verify")


def _measure_recall(vindex, exact: ExactTopK, qids, k: int, others=()) -> dict:
    """recall@k of ``vindex`` against the exact top lists, recorded on it (and ``others``)."""
    _, approx = vindex.search(exact.queries, k + 1)
    r = recall_at_k(approx, exact.result()[1], k, exclude=qids)
    recall = dict(k=k, recall=round(r, 4), queries=len(qids), nprobe=vindex.nprobe,
                  queries_from="training sketches, own id excluded")
    for v in (vindex, *others):
        v.recall = recall
    log.info("index: recall@%d = %.4f against exact search (%d queries)", k, r, len(qids))
    return recall


def load_faiss(path: Path, cfg: dict, *, mmap: bool = False, verify: bool = True):
    """The finished index's FAISS index: its one file, or its parts searched as one."""
    names = cfg.get("index_files") or [cfg["index_file"]]
    parts = [VectorIndex.load(path / name, mmap=mmap, verify=verify) for name in names]
    return SketchedIndex.wrap(parts[0] if len(parts) == 1 else ShardedIndex(parts),
                              cfg.get("index"))
