"""Growing a living index with several processes:

    grass-index add DIR --task T --worker I/N       # each worker: its share of the new examples
    grass-index merge DIR                            # then: copy the shares in, commit
    torchrun --nproc_per_node=N -m grass_index add DIR --task T      # both in one command

The work is a single-process add's (grow.py) cut into units: the fill-up of a short last batch
(examples [n_old, (j0+1)·B) when the index ends mid-batch) and the new batches [b·B, (b+1)·B).
Worker I of N sketches the units of the batches b with b % N == I into its own store
``adds/I-of-N/`` (the fill-up as an array, the batches as blocks; resumable like pass 1). The
merge copies the units into the main store in batch order — the rows, blocks and digests a
single-process add writes — and commits the generation as that add does (commit.py), so the
sketches, the Fisher and the scores equal a single-process add's. Only pass 1 is spread: the
commit (Fisher update, refit, FAISS) runs in one process, rank 0 under torchrun.

A shard records what it extends (the base generation's number and config hash, n_old), the
grown data's build record (model hash, n_train, data_hash) and a fingerprint of every new
example: a worker re-run over other data, and shards of another generation or of other new
data, are refused in one line naming the fix. The merge deletes adds/ once the generation is
committed (its shards extend a generation that is no longer the newest); a merge killed
before that finds the generation committed and only deletes them.
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ..batching import batch_count
from ..errors import spelled
from ..calls import collate_items
from ..fileio import check_dir
from ..indexdir.config import check_index_dir, read_record
from ..indexdir.errors import AttributionError
from ..indexdir.files import ADDS_DIR, STORE_DIR, jsonable
from ..indexdir.fingerprints import DIGEST_BYTES, block_digest, example_digest
from ..indexdir.record import build_diff
from ..indexdir.records import BuildRecord
from ..pipeline.parallel.distributed import Group, wanted
from ..pipeline.parallel.sharding import differing_examples, parse_worker, shard_name
from ..pipeline.progress import Progress
from ..pipeline.run import BuildResult, ShardInfo
from ..pipeline.sketching import _sketch_batch, sketch_training_set
from ..store import SketchStore, StoreError
from .commit import index_options, recorded_build, settle
from .grow import (add_in_process, check_indexed,
                   commit_grown, grown_at_end, merge_command, prepare, warn_drift)

NEW_DIGESTS = "new_digests"  # uint8 [m, DIGEST_BYTES]: the new examples this worker read
FILL, FILL_DIGEST = "fill", "fill_digest"  # the fill-up's rows (array) and digest (meta, hex)
_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def add_examples(path, model, train_data: Sequence, loss_fn, *, distributed=None,
                 **kw) -> BuildResult:
    """Grow the index in ``path`` (``grow.add_in_process``'s arguments): in this process, or
    under torchrun (``distributed``, default: more than one rank) on every rank."""
    if wanted(distributed):
        res = add_ranks(Path(path), model, train_data, loss_fn, **kw)
        if res is not None:
            return res
    return add_in_process(path, model, train_data, loss_fn, **kw)


def _units(n_old: int, n: int, B: int):
    """(the fill-up (batch, lo, hi) of the index's short last batch, or None; the numbers of
    the new batches), as a single-process add sketches them."""
    fill = (n_old // B, n_old, min(n, (n_old // B + 1) * B)) if n_old % B else None
    return fill, list(range(-(-n_old // B), batch_count(n, B)))


def _new_digests(data: Sequence, n_old: int) -> np.ndarray:
    out = np.empty((len(data) - n_old, DIGEST_BYTES), np.uint8)
    for i in range(n_old, len(data)):
        out[i - n_old] = np.frombuffer(example_digest(data[i]), np.uint8)
    return out


def _worker_command(path, w: str, task: str | None = None) -> str:
    """`add --worker w` of ``path`` as the caller runs it; ``task``: how the command line
    names the task (``--task FILE``, ``--hf-model DIR --data FILE``; default a placeholder)."""
    return spelled(f"`grass-index add {shlex.quote(str(path))} {task or '--task TASK'} "
                   f"--worker {w}`",
                   f"add_shard({str(path)!r}, model, train_data, loss_fn, {w!r})")


def refuse_grown_shard(path, model, train_data: Sequence, loss_fn, worker, options, *,
                       collate=None, device=None, task: str | None = None) -> None:
    """`build --worker I/N` into the finished index ``path`` over training data that grew at
    the end (``grow.grown_at_end``) would refuse a different build: one line naming the add
    that does it, `add --worker I/N` then `merge` (``task``: how the command line names the
    task, for the exact command). Anything else passes (a build resumes or refuses as ever)."""
    worker = parse_worker(worker)
    if worker is None or not grown_at_end(path, model, train_data, loss_fn, options,
                                          collate=collate, device=device):
        return
    n_old, n, w = read_record(Path(path)).n_train, len(train_data), f"{worker[0]}/{worker[1]}"
    raise AttributionError(
        f"index {path} holds the first {n_old} of these {n} training examples, unchanged (the "
        f"data grew at the end): sketch only the {n - n_old} new one(s) with "
        f"{_worker_command(path, w, task)} on each worker I/N, then {merge_command(path)}; "
        + spelled("`build --worker I/N` makes a new index (another --out)",
                  "build_shard makes a new index (another out)"))


def _every() -> str:
    return spelled("every `add --worker I/N`", "add_shard for every worker")


def _ids(ids: list[int], shown: int = 6) -> str:
    return ", ".join(map(str, ids[:shown])) + (f", ... ({len(ids)} in all)"
                                               if len(ids) > shown else "")


def add_shard(path, model, train_data: Sequence, loss_fn, worker, *, collate=None,
              progress=True, device=None, workers: int | None = None, task: dict | None = None,
              retrain: bool = False) -> ShardInfo:
    """`add --worker I/N`: sketch worker I's share of the examples ``train_data`` has beyond
    the index in ``path`` into ``adds/I-of-N/`` (resumable); `merge` commits them. Worker I
    also checks the indexed examples of the old batches b % N == I against their stored
    fingerprints (a one-process add checks them all)."""
    path, worker = check_index_dir(path), parse_worker(worker)
    if worker is None:
        raise AttributionError("add_shard needs worker=(i, n) or 'i/n'")
    record, prep = prepare(path, model, train_data, loss_fn, collate=collate, device=device,
                           workers=workers)
    with SketchStore.open(path / STORE_DIR, readonly=True) as store:  # the N workers check
        check_indexed(path, store, record, prep, train_data, *worker)  # each example once
    prog = Progress(progress)
    try:
        return _sketch_share(path, record, prep, train_data, worker, prog,
                             dict(task=task, retrain=bool(retrain)))
    finally:
        prog.close()


def _sketch_share(path: Path, record, prep, data: Sequence, worker, prog,
                  records: dict) -> ShardInfo:
    i, N = worker
    B, n_old = prep.batch_size, record.n_train
    fill, batches = _units(n_old, len(data), B)
    mine = [b for b in batches if b % N == i]
    fills = fill is not None and fill[0] % N == i
    spath = path / ADDS_DIR / shard_name(i, N)
    meta = jsonable(dict(add=dict(base=record.generation.number, base_config=record.config_hash,
                                  n_old=n_old), build=prep.build, shard=[i, N]))
    digests = _new_digests(data, n_old)
    _refuse_other_splits(path, N)
    _refuse_stale(path, spath, meta, digests, f"re-run {_every()}")
    prog.note(f"index {path} holds {n_old} examples; worker {i}/{N} sketches "
              f"{len(mine) + fills} of the {len(batches) + (fill is not None)} new batch(es)")
    with SketchStore.create(spath, dim=prep.sketcher.dim, meta=meta) as store:
        if not store.has_array(NEW_DIGESTS):
            store.put_array(NEW_DIGESTS, digests)
        for key, value in records.items():
            if store.get_meta(key, None) != jsonable(value):
                store.put_meta(key, jsonable(value))
        if fills and store.get_meta(FILL_DIGEST, None) is None:
            j, lo, hi = fill
            items = [data[k] for k in range(lo, hi)]
            batch = collate_items(prep.collate, items, f"training examples {lo}..{hi - 1}")
            store.put_array(FILL, _sketch_batch(prep.sketcher, batch, prep.loss_fn, lo, hi,
                                                j).numpy())
            store.put_meta(FILL_DIGEST, block_digest(items).hex())  # last: the fill-up is done
        sketch_training_set(store, prep.sketcher, data, prep.loss_fn, batch_size=B,
                            collate=prep.collate, progress=prog, blocks=mine,
                            workers=prep.workers)
        rows = store.num_rows + (fill[2] - fill[1] if fills else 0)
    return ShardInfo(shard=f"{i}/{N}", path=str(spath), batches=len(mine) + fills, rows=rows,
                     n_batches=len(batches) + (fill is not None))


def _stale(old: dict, meta: dict, old_digests, digests) -> str | None:
    """How a shard's creation record ``old`` (and its new examples' fingerprints) differ from
    ``meta`` (and ``digests``): "was sketched ..." completes it; None when they agree."""
    a, b = old.get("add") or {}, meta["add"]
    if a.get("base") != b["base"]:
        return f"for generation {a.get('base')} of the index, not generation {b['base']}"
    if a != b:
        return (f"for another index (config hash {a.get('base_config')}, not "
                f"{b['base_config']})")
    if old.get("build") != meta["build"]:
        return f"for other data or settings ({build_diff(old.get('build') or {}, meta['build'])}"
    if old_digests is not None and digests is not None:
        diff = differing_examples(old_digests, digests)
        if diff:
            ids = _ids([b["n_old"] + d for d in diff])
            return f"over other new examples (training examples {ids} differ)"
    return None


def _refuse_stale(path: Path, spath: Path, meta: dict, digests, then: str) -> None:
    """A shard begun for another generation or other new data: one line naming the fix."""
    if not check_dir(spath):
        return
    try:
        with SketchStore.open(spath, readonly=True) as st:
            old = st.meta
            have = st.get_array(NEW_DIGESTS) if st.has_array(NEW_DIGESTS) else None
    except StoreError:
        return  # created but never written: SketchStore.create takes it over
    problem = _stale(old, meta, have, digests)
    if problem:
        raise AttributionError(f"add shard {spath} was sketched {problem}; delete "
                               f"{path / ADDS_DIR} and {then}")


def _shards(path: Path) -> dict[tuple[int, int], Path]:
    """adds/'s shards by (i, n); anything else there is refused, naming it."""
    adds = path / ADDS_DIR
    found = {}
    if not check_dir(adds):
        return found
    for p in sorted(adds.iterdir()):
        if p.name.startswith("."):
            continue
        m = _NAME.match(p.name)
        if not m or not p.is_dir() or not int(m.group(1)) < int(m.group(2)):
            raise AttributionError(f"{p} is not an add shard (directories I-of-N made by "
                                   + spelled("`add --worker I/N`", "add_shard(..., worker='I/N')")
                                   + "); remove it")
        found[int(m.group(1)), int(m.group(2))] = p
    return found


def _refuse_other_splits(path: Path, n: int) -> None:
    other = sorted({k for _, k in _shards(path) if k != n})
    if other:
        raise AttributionError(
            f"{path / ADDS_DIR} holds the shards of an add split {other[0]} ways; finish it "
            f"with {merge_command(path)}, or delete {path / ADDS_DIR} to split it {n} ways")


def pending(path) -> bool:
    """``path`` holds the shards of a split add, waiting for their merge."""
    path = Path(path)
    return path.is_dir() and bool(_shards(path))


def _check_shards(path: Path, n: int | None) -> tuple[int, list[Path], list[dict]]:
    """The shards of one split: all there, complete, the same add over the same new data;
    (n, their paths, per shard {meta, kv, fill})."""
    found = _shards(path)
    if not found:
        raise AttributionError(f"{path} has no add shards ({path / ADDS_DIR} is missing or "
                               f"empty); run {_worker_command(path, 'I/N')} for I = 0..N-1 "
                               "first")
    splits = sorted({k for _, k in found})
    if n is None and len(splits) > 1:
        raise AttributionError(f"{path / ADDS_DIR} holds add shards of {len(splits)} splits "
                               f"(N = {', '.join(map(str, splits))}); delete the stale split's "
                               "I-of-N directories, or pass "
                               + spelled("--shards N", "shards=N"))
    n = splits[0] if n is None else n
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        raise AttributionError(
            f"missing add shards {', '.join(shard_name(i, n) for i in missing)}; run "
            + " and ".join(_worker_command(path, f"{i}/{n}")
                           for i in missing[:3]) + (" ..." if len(missing) > 3 else "")
            + ", then merge again")
    paths, shards, first = [found[i, n] for i in range(n)], [], None
    for i, p in enumerate(paths):
        with SketchStore.open(p, readonly=True) as st:
            s = dict(meta=st.meta, kv=st.all_meta(), blocks=st.committed_blocks,
                     digests=st.get_array(NEW_DIGESTS) if st.has_array(NEW_DIGESTS) else None)
        if s["meta"].pop("shard", None) != [i, n]:
            raise AttributionError(f"{p} holds another worker's share than {shard_name(i, n)} "
                                   f"(renamed?); delete {path / ADDS_DIR} and re-run "
                                   f"{_every()}")
        if first is not None:
            problem = _stale(s["meta"], first["meta"], s["digests"], first["digests"])
            if problem:
                raise AttributionError(f"cannot merge {path}: add shard {shard_name(i, n)} was "
                                       f"sketched {problem} (compared with shard "
                                       f"{shard_name(0, n)}); delete {path / ADDS_DIR} and "
                                       f"re-run {_every()}")
        first = first or s
        shards.append(s)
    _check_complete(path, n, shards)
    return n, paths, shards


def _check_complete(path: Path, n: int, shards: list[dict]) -> None:
    add, build = shards[0]["meta"]["add"], shards[0]["meta"]["build"]
    fill, batches = _units(add["n_old"], build["n_train"], build["batch_size"])
    for i, s in enumerate(shards):
        need = len([b for b in batches if b % n == i])
        fills = fill is not None and fill[0] % n == i
        if s["blocks"] != need or (fills and FILL_DIGEST not in s["kv"]) or s["digests"] is None:
            raise AttributionError(
                f"add shard {shard_name(i, n)} is incomplete ({s['blocks']} of {need} batches"
                f"{', the fill-up missing' if fills and FILL_DIGEST not in s['kv'] else ''}); "
                f"re-run {_worker_command(path, f'{i}/{n}')} to finish it "
                "(it resumes)")


def _copy_units(store, meta: dict, n: int, paths: list[Path], progress) -> None:
    """The shards' rows into the main store as a single-process add writes them: the fill-up
    grows the last block, the new batches are appended in order (rows a killed merge or add
    stored are rolled back first: copying again is cheap)."""
    add, build = meta["add"], meta["build"]
    n_old, n_new, B = add["n_old"], build["n_train"], build["batch_size"]
    if store.num_rows > n_old:
        store.truncate(n_old, B)
    fill, batches = _units(n_old, n_new, B)
    readers = [SketchStore.open(p, readonly=True) for p in paths]
    try:
        if fill is not None:
            r = readers[fill[0] % n]
            store.grow_block(fill[0], r.get_array(FILL),
                             digest=bytes.fromhex(r.get_meta(FILL_DIGEST)))
        its = [r.iter_blocks() for r in readers]
        local = [0] * n
        for k, b in enumerate(batches):
            _, rows = next(its[b % n])
            want = min(n_new, (b + 1) * B) - b * B
            if len(rows) != want:
                raise AttributionError(f"add shard {paths[b % n]} holds {len(rows)} rows for "
                                       f"batch {b}, expected {want}; delete it and re-run its "
                                       "worker")
            store.put_block(b, b * B, rows,
                            digest=readers[b % n].block_digest(local[b % n]))
            local[b % n] += 1
            progress("merge", k + 1, len(batches))
    finally:
        for r in readers:
            r.close()


def merge_added(path, *, n: int | None = None, options=None, overrides: dict | None = None,
                progress=True) -> BuildResult:
    """Commit the generation the shards of `add --worker I/N` sketched (all N of them, the
    same add over the same new data, made for the index's newest generation); ``options``
    (IndexOptions) or ``overrides`` (hessian/damping/index) for pass 2, default the recorded
    ones. Deletes adds/ once committed."""
    path = check_index_dir(path)
    settle(path)
    n, paths, shards = _check_shards(path, n)
    meta = shards[0]["meta"]
    # the shards' JSON sorts the layout's keys (h.10 before h.2): back to column order, or
    # pass 2 would slice one layer's columns for another (a 12-block GPT-2's 40 of 48 layers)
    add = meta["add"]
    build = dict(BuildRecord(meta["build"], f"the add shards of {path}").raw)
    prog = Progress(progress)
    try:
        with SketchStore.open(path / STORE_DIR, readonly=False) as store:
            record = read_record(path)  # under the writer lock: the generation we extend
            done = (record.generation.number == add["base"] + 1 and jsonable(
                recorded_build(store, record)) == build)
            if not done:
                now = dict(base=record.generation.number, base_config=record.config_hash,
                           n_old=record.n_train)
                problem = _stale(meta, dict(meta, add=now), None, None)
                if problem:
                    raise AttributionError(
                        f"cannot merge {path}: its add shards were sketched {problem} (the "
                        f"index changed since); delete {path / ADDS_DIR} and re-run "
                        f"{_every()}")
                _copy_units(store, meta, n, paths, prog)
                if overrides and any(v is not None for v in overrides.values()):
                    options = index_options(record).replace(**overrides)
                retrain = any(s["kv"].get("retrain") for s in shards)
                cfg = commit_grown(path, store, record, build, build["n_train"] - add["n_old"],
                                   progress=prog, task=shards[0]["kv"].get("task"),
                                   options=options, retrain=retrain)
            else:
                prog.note(f"the add shards of {path} were merged already (generation "
                          f"{record.generation.number}); deleting them")
                cfg = dict(record.raw)
    finally:
        prog.close()
    delete_shards(path)
    if not done:
        warn_drift(path, cfg, add["n_old"], retrain)
    return BuildResult(path, cfg)


def delete_shards(path: Path) -> None:
    """adds/ goes once its generation is committed (a symlinked adds/ is refused)."""
    if check_dir(path / ADDS_DIR):
        shutil.rmtree(path / ADDS_DIR, ignore_errors=True)


def add_ranks(path: Path, model, train_data: Sequence, loss_fn, *, progress=True,
              device=None, options=None, **kw) -> BuildResult | None:
    """torchrun: rank r of W sketches worker r/W's share, then rank 0 merges and commits;
    every rank returns the result (``reporting`` on rank 0). None: one rank only."""
    group = Group()
    if group.world == 1:
        group.close()
        return None
    try:
        device = group.device(device)
        group.step(lambda: add_shard(path, model, train_data, loss_fn,
                                     (group.rank, group.world), progress=progress,
                                     device=device, **kw))
        cfg = group.step(lambda: merge_added(path, n=group.world, options=options,
                                             progress=progress).config
                         if group.rank == 0 else None)[0]
        return BuildResult(path, cfg, reporting=group.rank == 0)
    finally:
        group.close()
