"""Builds split over workers: `build --worker i/n` sketches one shard, `merge` finishes.

The unit of work is the fixed batch [b*B, (b+1)*B) of a single-process build: worker i of n
owns batches b with b % n == i, so every batch's sketch is the single-process one. A worker
writes its batches into its own store ``shards/i-of-n/`` (local blocks 0, 1, ...: local block j
is global batch i + j*n), resumable like pass 1. Its store's creation meta is build.json plus
``shard: [i, n]``; its key-value meta records what pass 2 needs without the model or the data
(layer descriptions, task reference, item signature, pass-2 arguments).

A worker whose pass 2 will need the eFIM also sums its own rows' ĝĝᵀ (float64, kept in its
store as ``fisher_sum/<layer>`` + ``fisher_partial_n``): that pass over the data then runs on n
workers at once, and the merge only adds n k×k matrices per layer (a torchrun build all-reduces
them instead). The sum order differs from one process's, so the Fisher — and the scores —
equal a single-process build's to float64 rounding, not bit for bit; the sketches are equal.

Every worker also fingerprints the *whole* training set (``data_digests``: one 16-byte digest
per example, kept in its store): a worker sketches only its own batches, so only this proves
that all of them read the same dataset. ``merge`` refuses shards whose fingerprints differ,
naming the example ids (two labels changed between workers would otherwise mix two datasets
into one index, and verify could not tell).

``merge`` checks that shards 0..n-1 all exist, are complete and are the same build, copies
their blocks into the main store in global batch order (resumable, so the main store holds
exactly a single-process build's sketches), caches the summed Fisher there, then runs the
normal pass 2 (``finish``).
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np

from ...errors import option, spelled
from ...precondition import FisherAccumulator
from ...store import SketchStore, StoreError
from ...indexdir.errors import AttributionError
from ...fileio import check_dir
from ...indexdir.files import BUILD_FILE, SHARDS_DIR, STORE_DIR, jsonable
from ...indexdir.fingerprints import DIGEST_BYTES, example_digest
from ..options import IndexOptions
from ..factors import factor_shapes, merge_shard_factors
from ..pass2 import accumulate, finish, has_fisher, put_fisher
from ...indexdir.record import check_directory, n_batches, read_build_record
from ..sketching import sketch_training_set

log = logging.getLogger("grass_index")
_SHARD_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def parse_worker(worker) -> tuple[int, int] | None:
    """None, (i, n) or "i/n" -> (i, n) with 0 <= i < n; a clear error otherwise."""
    if worker is None:
        return None
    if isinstance(worker, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", worker)
        if not m:
            raise AttributionError(f"{spelled(f'--worker {worker!r}', f'worker={worker!r}')} "
                                   "is not of the form I/N (worker I of N, counted from 0), e.g. "
                                   f"{option('worker', '0/4')}")
        worker = (int(m.group(1)), int(m.group(2)))
    try:
        i, n = (int(v) for v in worker)
    except (TypeError, ValueError):
        raise AttributionError(f"worker must be (i, n) or 'i/n', got {worker!r}") from None
    if n < 1 or not 0 <= i < n:
        raise AttributionError(f"worker {i}/{n}: need 0 <= i < n (workers are numbered from 0)")
    return i, n


def shard_name(i: int, n: int) -> str:
    return f"{i}-of-{n}"


def _owned(build: dict, i: int, n: int) -> range:
    return range(i, n_batches(build), n)


def sketch_shard(out: Path, worker: tuple[int, int], sketcher, build: dict, *, train_data,
                 loss_fn, batch_size: int, collate, progress, records: dict,
                 workers: int | None = 0) -> dict:
    """Pass 1 over worker i's batches into shards/i-of-n (resumable); what it holds."""
    i, n = worker
    check_dir(out / SHARDS_DIR)  # the file rule: never a store through a symlinked shards/
    path = out / SHARDS_DIR / shard_name(i, n)
    blocks = _owned(build, i, n)
    meta = jsonable(dict(build, shard=[i, n]))
    digests = dataset_digests(train_data)
    with SketchStore.create(path, dim=sketcher.dim, meta=meta) as store:
        record_dataset(store, digests, f"shard {shard_name(i, n)} ({path})")
        for key, value in records.items():
            if store.get_meta(key, None) != jsonable(value):
                store.put_meta(key, jsonable(value))
        sketch_training_set(store, sketcher, train_data, loss_fn, batch_size=batch_size,
                            collate=collate, progress=progress, blocks=blocks,
                            factors=factor_shapes(sketcher), workers=workers)
        if (records.get("finish") or {}).get("hessian", "eFIM") == "eFIM":
            shard_fisher(store, build["layout"], progress)
        return dict(shard=f"{i}/{n}", path=str(path), batches=len(blocks),
                    rows=store.num_rows, n_batches=n_batches(build))


DATA_DIGESTS = "data_digests"  # uint8 [n_train, DIGEST_BYTES]: the dataset a worker read


def dataset_digests(data) -> np.ndarray:
    """One fingerprint per training example (its tensors' bytes, dtypes and shapes)."""
    out = np.empty((len(data), DIGEST_BYTES), np.uint8)
    for i in range(len(data)):
        out[i] = np.frombuffer(example_digest(data[i]), np.uint8)
    return out


def differing_examples(a: np.ndarray, b: np.ndarray) -> list[int]:
    """Example ids whose fingerprints differ (every id past the shorter one too)."""
    n = min(len(a), len(b))
    ids = np.flatnonzero((a[:n] != b[:n]).any(axis=1)).tolist()
    return ids + list(range(n, max(len(a), len(b))))


def _ids(ids: list[int], shown: int = 8) -> str:
    return ", ".join(map(str, ids[:shown])) + (f", ... ({len(ids)} in all)"
                                               if len(ids) > shown else "")


def record_dataset(store, digests: np.ndarray, what: str) -> None:
    """Keep the fingerprints of the dataset this worker reads; a resumed worker must read the
    same one (it would otherwise finish with sketches of two datasets)."""
    if store.has_array(DATA_DIGESTS):
        old = store.get_array(DATA_DIGESTS)
        diff = differing_examples(old, digests)
        if diff:
            raise AttributionError(
                f"{what}: the training data changed since this worker started (examples "
                f"{_ids(diff)} differ); delete the shard and re-run the worker with the data "
                "every worker reads")
        return
    store.put_array(DATA_DIGESTS, digests)


def shard_fisher(store, layout, progress=None) -> FisherAccumulator:
    """This shard's Fisher sums, computed once and cached in its store (when writable)."""
    acc = FisherAccumulator(layout)
    n = store.get_meta("fisher_partial_n", None)
    if n is not None and all(store.has_array(f"fisher_sum/{k}") for k in layout):
        acc.load_state_dict({"n": n, **{f"sum/{k}": store.get_array(f"fisher_sum/{k}")
                                        for k in layout}})
        return acc
    acc = accumulate(store, layout, progress and (
        lambda done: progress("fisher", done, store.num_rows)))
    if not store.readonly:
        for key, value in acc.state_dict().items():
            if key.startswith("sum/"):
                store.put_array(f"fisher_sum/{key[4:]}", value)
        store.put_meta("fisher_partial_n", int(acc.n))  # last: marks the sums complete
    return acc


def read_shard_fisher(out: Path, worker: tuple[int, int], layout) -> FisherAccumulator:
    with SketchStore.open(out / SHARDS_DIR / shard_name(*worker), readonly=True) as store:
        return shard_fisher(store, layout)


def _worker_build(worker: str, out=None) -> str:
    """One worker's build as the caller runs it: `grass-index build TASK --out DIR --worker
    I/N` on the command line, ``build_shard(model, train_data, loss_fn, 'DIR', 'I/N')`` in
    Python."""
    if out is None:
        return spelled(f"`build --worker {worker}`",
                       f"`build_shard(model, train_data, loss_fn, DIR, {worker!r})`")
    return spelled(f"`grass-index build TASK --out {out} --worker {worker}`",
                   f"`build_shard(model, train_data, loss_fn, {str(out)!r}, {worker!r})`")


def _shard_dirs(out: Path, n: int | None) -> tuple[int, dict[int, Path]]:
    """The shards of one split (n), by worker number; errors for duplicates and mixtures."""
    sdir = out / SHARDS_DIR
    check_dir(sdir)  # the file rule: a symlinked shards/ is refused, naming it
    entries = sorted(p for p in sdir.iterdir() if not p.name.startswith(".")) \
        if sdir.is_dir() else []
    if not entries:
        raise AttributionError(f"{out} has no shards ({sdir} is missing or empty); run "
                               f"{_worker_build('I/N', 'DIR')} for I = 0..N-1 first")
    found: dict[tuple[int, int], list[Path]] = {}
    for p in entries:
        m = _SHARD_NAME.match(p.name)
        if not m or not p.is_dir():
            raise AttributionError(f"{p} is not a shard (expected directories named I-of-N made "
                                   f"by {_worker_build('I/N')}); remove it")
        i, k = int(m.group(1)), int(m.group(2))
        if not 0 <= i < k:
            raise AttributionError(f"{p}: worker {i} of {k} is out of range; remove it")
        found.setdefault((i, k), []).append(p)
    dups = {f"{i}-of-{k}": [q.name for q in ps] for (i, k), ps in found.items() if len(ps) > 1}
    if dups:
        raise AttributionError("duplicate shards: " + "; ".join(
            f"{', '.join(v)} are all worker {k}" for k, v in sorted(dups.items()))
            + "; keep one of each and remove the others")
    splits = sorted({k for _, k in found})
    if n is None:
        if len(splits) > 1:
            raise AttributionError(
                f"{sdir} holds shards of {len(splits)} different splits (N = "
                f"{', '.join(map(str, splits))}), which cover the same batches twice; remove the "
                f"stale split's I-of-N directories, or pass {spelled('--shards N', 'shards=N')} "
                "to merge one split")
        n = splits[0]
    shards = {i: ps[0] for (i, k), ps in found.items() if k == n}
    missing = [i for i in range(n) if i not in shards]
    if missing:
        have = ", ".join(shard_name(i, n) for i in sorted(shards)) or "none"
        raise AttributionError(
            f"missing shards {', '.join(shard_name(i, n) for i in missing)} (have: {have}); run "
            + " and ".join(_worker_build(f"{i}/{n}", out) for i in missing[:3])
            + (" ..." if len(missing) > 3 else "")
            + ", then merge again")
    return n, shards


def _check_shards(out: Path, build: dict, n: int, shards: dict[int, Path]) -> list[dict]:
    """Every shard is the same build as build.json and complete; its key-value records."""
    problems, records = [], []
    for i in range(n):
        path, name = shards[i], shard_name(i, n)
        try:
            with SketchStore.open(path, readonly=True) as st:
                meta, done, kv = st.meta, st.committed_blocks, st.all_meta()
        except StoreError as e:
            problems.append(f"shard {name} is unreadable ({e}); delete {path} and re-run "
                            + _worker_build(f"{i}/{n}"))
            continue
        shard = meta.pop("shard", None)
        want = jsonable(build)
        if shard != [i, n] or meta != want:
            diff = sorted(k for k in set(meta) | set(want) if meta.get(k) != want.get(k))
            if shard != [i, n]:
                diff.insert(0, f"shard (it says {shard})")
            problems.append(f"shard {name} is a different build than {out / BUILD_FILE} "
                            f"(differs in: {', '.join(diff)}); delete {path} and re-run "
                            + _worker_build(f"{i}/{n}") + " with the same task and options")
            continue
        need = len(_owned(build, i, n))
        if done != need:
            problems.append(f"shard {name} is incomplete ({done} of {need} batches sketched); "
                            f"re-run {_worker_build(f'{i}/{n}')} to finish it (it resumes)")
            continue
        records.append(kv)
    if problems:
        raise AttributionError(f"cannot merge {out}: " + "; ".join(problems))
    _check_same_dataset(out, n, shards)
    return records


def _check_same_dataset(out: Path, n: int, shards: dict[int, Path]) -> None:
    """Every shard read the same training set (per-example fingerprints), or one error naming
    the workers and example ids that differ from worker 0's."""
    problems, first = [], None
    for i in range(n):
        with SketchStore.open(shards[i], readonly=True) as st:
            if not st.has_array(DATA_DIGESTS):
                problems.append(f"shard {shard_name(i, n)} holds no fingerprint of the training "
                                "set (written by an older grass-index); delete it and re-run "
                                + _worker_build(f"{i}/{n}"))
                continue
            digests = st.get_array(DATA_DIGESTS)
        if first is None:
            first = (i, digests)
            continue
        diff = differing_examples(first[1], digests)
        if diff:
            problems.append(f"shard {shard_name(i, n)} read other training data than shard "
                            f"{shard_name(first[0], n)} (examples {_ids(diff)} differ)")
    if problems:
        raise AttributionError(
            f"cannot merge {out}: " + "; ".join(problems) + ". Every worker must read the same "
            "training set; delete the shards of the workers whose data was wrong and re-run "
            "them with the right data")


def merge_setup(out: Path, n: int | None, overrides: dict):
    """Checks before merging: build.json, the shards of one split (all present, complete, the
    same build); the pass-2 options (the workers', then ``overrides``)."""
    check_directory(out, "index directory", "pass the directory the workers wrote into ("
                    + spelled("`grass-index build TASK --out DIR --worker I/N` or `grass-index "
                              "add DIR --task TASK --worker I/N`",
                              "build_shard(..., out='DIR', worker='I/N') or add_shard('DIR', "
                              "..., worker='I/N')") + ")")
    build = read_build_record(out, missing=(
        f"{out} has no {BUILD_FILE}; it is not a grass-index build directory (run "
        f"{_worker_build('I/N', 'DIR')})"))
    n, shards = _shard_dirs(out, n)
    records = _check_shards(out, build, n, shards)
    rec = records[0]
    opts = dict(rec.get("finish") or {})
    if any((r.get("finish") or {}) != opts for r in records[1:]):
        log.warning("the workers were given different pass-2 options (hessian/damping/index); "
                    "using worker 0's: %s", opts)
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return build, n, shards, rec, IndexOptions.from_record(opts)


def copy_shards(store, build: dict, n: int, shards: dict[int, Path], progress) -> None:
    """Shard blocks -> the main store in global batch order (resumes where it stopped)."""
    n_blocks, B, n_train = n_batches(build), build["batch_size"], build["n_train"]
    start = store.committed_blocks
    if start >= n_blocks:
        return
    readers = [SketchStore.open(shards[i], readonly=True) for i in range(n)]
    try:
        # shard i's first block still to copy: how many of its batches precede `start`
        its = [readers[i].iter_blocks(len(range(i, start, n))) for i in range(n)]
        progress("merge", start, n_blocks)
        for b in range(start, n_blocks):
            _, rows = next(its[b % n])
            want = min(n_train, (b + 1) * B) - b * B
            if len(rows) != want:
                raise AttributionError(
                    f"shard {shard_name(b % n, n)} holds {len(rows)} rows for batch {b}, "
                    f"expected {want}; delete {shards[b % n]} and re-run its worker")
            store.put_block(b, b * B, rows, digest=readers[b % n].block_digest(b // n))
            progress("merge", b + 1, n_blocks)
    finally:
        for r in readers:
            r.close()


def cache_fisher(store, build: dict, n: int, shards: dict[int, Path],
                 fisher: FisherAccumulator | None) -> None:
    """The summed Fisher into the main store, where pass 2 (and later refits) look first."""
    if has_fisher(store, build["layout"]):
        return
    if fisher is None:
        fisher = FisherAccumulator(build["layout"])
        for i in range(n):
            with SketchStore.open(shards[i], readonly=True) as reader:
                fisher.merge(shard_fisher(reader, build["layout"]))
    if fisher.n != build["n_train"]:
        raise AttributionError(f"the shards' Fisher sums cover {fisher.n} rows, not "
                               f"{build['n_train']}; delete the shards and rebuild")
    put_fisher(store, fisher)


def merge(out: Path, *, n: int | None = None, overrides: dict | None = None, progress,
          remove_shards: bool = False) -> dict:
    """Shards -> main store (global batch order) -> pass 2 on this process, with the workers'
    pass-2 options and the non-None ``overrides`` (IndexOptions fields). Returns the
    finished config."""
    out = Path(out)
    build, n, shards, rec, opts = merge_setup(out, n, overrides or {})
    with SketchStore.create(out / STORE_DIR, dim=build["dim"], meta=jsonable(build)) as store:
        copy_shards(store, build, n, shards, progress)
        merge_shard_factors(store, shards, n)
        if opts.hessian == "eFIM":
            cache_fisher(store, build, n, shards, None)
        cfg = finish(out, store, build, rec.get("describe") or {}, opts,
                     task=rec.get("task"), progress=progress,
                     old_config=dict(item_signature=rec.get("item_signature")),
                     again="merge")
    if remove_shards:
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    return cfg
