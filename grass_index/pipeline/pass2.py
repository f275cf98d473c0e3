"""Pass 2: Fisher -> preconditioner -> FAISS -> config.json, one implementation
(``run_pass2``) for a single process, a merge of worker shards and torchrun.

Pass 2 reads pass 1's blocks back, so changing the damping or the Hessian never recomputes a
gradient (``refit``). It streams: a single-process build hands over the Fisher sums pass 1
accumulated (``pass1_fisher``), so the store is not re-read for them; the preconditioner is
fitted one layer at a time, each layer's sums factored in place; a layer with n < k is
fitted from the stored rows (the low-rank form, precondition/forms.py) and needs no k×k Fisher
at all. For wide sketches
(LMs) too many to hold exactly, FAISS holds a seeded search sketch of each vector and a query's
candidates are re-ranked exactly from the stored rows (index/choice.py, ``store_rerank``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import shlex
import datetime as _dt
import logging
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..version import __version__
from ..index.recall import measure_recall, recall_queries
from ..index.vector_index import make_template
from ..index import (ExactTopK, SearchSketch, ShardedIndex, SketchedIndex, VectorIndex,
                     parse_spec, part_ranges, recall_at_k)
from ..index import choice as search_choice
from ..capture.sketcher import MOVED_NOTE
from ..errors import option, spelled
from ..precondition import (ChunkedFisher, DampingError, FisherAccumulator,
                            Preconditioner, dense_layers,
                            load_preconditioner, save_preconditioner,
                            stale_preconditioner_arrays)
from ..precondition.damping import (LEGACY_DAMPING, RELATIVE_RANGE, format_damping,
                                     parse_damping)
from ..precondition.fisher import layer_slices
from ..store import SketchStore, StoreError
from ..indexdir.errors import AttributionError
from .factors import fit_ekfac
from ..fileio import remove_stale_temps, unlink_owned
from ..indexdir.files import (CONFIG_FILE, INDEX_FILE, STORE_DIR, index_file_names, jsonable,
                              saturated_name, write_json)
from ..indexdir.fingerprints import config_hash, data_signature, hash_json
from ..indexdir.generations import Generation, record_number
from .options import IndexOptions, damping_key
from .progress import Progress
from ..indexdir.record import n_batches, stored_build_record
from ..index.store_scan import (StoreScan, checked_queries, held_open, precondition_queries,
                                raw_rerank, saturated_blocks, starts_of, zero_blocks)
from ..indexdir.stored import chunks, damping_refused, preconditioned_blocks, store_rerank

log = logging.getLogger("grass_index")
# Temp names of FAISS and config writes by earlier versions (now fileio.TEMP_NAME's).
_OLD_TEMPS = re.compile(r"index-[0-9a-f]+[-0-9a-z]*\.faiss\.tmp-\d+-[0-9a-f]{8}"
                        r"|\.config\.json\.tmp\d+")


class OneProcess:
    """The ranks of a pass 2 run by one process (a single-process build, a merge, a refit):
    rank 0 of 1. ``distributed.Group`` has the same three members for torchrun."""

    rank, world = 0, 1

    def step(self, fn):
        """Run fn on every rank; every rank gets the list of results."""
        return [fn()]

    def share(self, fn, encode=None, decode=None):
        """Rank 0's ``fn()``, on every rank (here: as is, no round trip through bytes)."""
        return fn()


ONE_PROCESS = OneProcess()


class StoreRows:
    """The rows one process indexes in pass 2 when it has them all: the main store, whose ids
    are the training ids. (A torchrun rank holds its shard instead: ``distributed.ShardRows``.)"""

    def __init__(self, store, generation: Generation | None = None):
        self.store, self.generation = store, generation

    @contextlib.contextmanager
    def open(self):
        yield self.store

    def global_ids(self, start: int, count: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64)

    def query_rows(self, qids: np.ndarray):
        """(positions in qids, raw rows) of the recall queries held here: all of them."""
        return np.arange(len(qids)), np.asarray(self.store.get_rows(qids), np.float32)


def finish(out: Path, store, build: dict, describe: dict, opts: IndexOptions, *, task,
           progress, data=None, old_config=None, fisher: ChunkedFisher | None = None,
           tune: dict | None = None, again: str = "build", generation: Generation | None = None,
           template=None) -> dict:
    """Pass 2 over the main store (a single-process build, a merge, a refit): Fisher (the sums
    pass 1 accumulated, ``fisher``; else the cache, else a re-read of the store) ->
    preconditioner (reused when this variant was already fitted) -> FAISS -> config.json.
    ``tune``: the `tune` record to write into config.json (the sweep that chose ``opts``);
    without it a refit keeps the old config's record while it still describes ``opts``.
    A damping that does not fit these gradients is refused with the exact way to run pass 2
    again (``again``: "build", "merge" or "refit"); pass 1's sketches stay.
    ``generation``: the rows that count (a living index's, grass_index/living/; default: the
    one ``old_config`` records, else every row); ``template``: the empty FAISS index to fill
    (a grown IVF index keeps its quantizer)."""
    if generation is None:
        generation = Generation.from_record((old_config or {}).get("generation"),
                                            build["n_train"])
    try:
        return _finish(out, store, build, describe, opts, task=task, progress=progress,
                       data=data, old_config=old_config, fisher=fisher, tune=tune,
                       generation=generation, template=template)
    except DampingError as e:
        ref = (task or {}).get("task") if isinstance(task, dict) else task
        raise AttributionError(f"{e}. {rerun_with_damping(out, ref, opts.damping, e.needs, again)}"
                               ) from None


def _finish(out: Path, store, build: dict, describe: dict, opts: IndexOptions, *, task,
            progress, data, old_config, fisher, tune, generation, template) -> dict:
    layout = build["layout"]
    hessian, damping = opts.hessian, opts.damping
    n_blocks = n_batches(build)
    if store.committed_blocks < n_blocks:
        raise AttributionError(f"only {store.committed_blocks} of {n_blocks} batches are "
                               "sketched; re-run the build to finish pass 1")
    item_signature = (data_signature(data) if data is not None
                      else (old_config or {}).get("item_signature"))

    @contextlib.contextmanager
    def main_store(pre, key):
        yield store  # the preconditioner is stored already (right after fitting)

    return run_pass2(out, build, describe, opts, Pass2Run(
        rows=StoreRows(store, generation), generation=generation, template=template,
        fit=lambda: fit_streaming(store, layout, hessian, damping, progress, fisher,
                                  generation),
        main_store=main_store, stored=store,
        task=task if task is not None else old_task(old_config), item_signature=item_signature,
        progress=progress,
        extra={"tune": tune} if tune is not None else tuned_record(old_config, opts)))


def suggested_damping(damping, needs: str) -> str | None:
    """A damping to try instead of ``damping`` ("larger" or "smaller"), or None (then only
    --hessian identity, which has no damping, is left). "auto" moves its multiple by 10×; a
    fixed damping moves to 0.3 × mean eigenvalue, or from there by 10×."""
    if needs == "identity":
        return None
    mode, value = parse_damping(damping)
    if mode == "auto":
        moved = value * 10 if needs == "larger" else value / 10
        ok = RELATIVE_RANGE[0] <= moved <= RELATIVE_RANGE[1]
        return format_damping("auto", moved) if ok else None
    if mode == "absolute" or (value < LEGACY_DAMPING if needs == "larger"
                              else value > LEGACY_DAMPING):
        return format_damping("relative", LEGACY_DAMPING)
    if needs == "larger" and value * 10 <= RELATIVE_RANGE[1]:
        return format_damping("relative", value * 10)
    return None


def rerun_with_damping(out: Path, task_ref, damping, needs: str, again: str) -> str:
    """The exact way to run pass 2 again with another damping, in the caller's spelling."""
    x = suggested_damping(damping, needs)
    if again == "refit":
        return ("The index keeps its current preconditioner; re-precondition it with " +
                (spelled(f"--damping {x}", f"reprecondition(damping={x!r})") + " or "
                 if x else "") + spelled("--hessian identity", "hessian='identity'"))

    def rerun(opt: str) -> str:  # opt: an option as the caller writes it
        if again == "merge":
            return spelled(f"`grass-index merge {shlex.quote(str(out))} {opt}`",
                           f"merge_shards({str(out)!r}, {opt})")
        task = shlex.quote(str(task_ref)) if task_ref else "TASK"
        return spelled(f"`grass-index build {task} --out {shlex.quote(str(out))} {opt}`",
                       f"build_index(..., {opt})")
    other = "" if again == "merge" else spelled(" (with the build's other options)",
                                                " (the other arguments as before)")
    fixes = [rerun(option("damping", x))] if x else []
    fixes.append(rerun(option("hessian", "identity")))
    return (f"Pass 1's sketches are kept in {out}: re-run " + " or ".join(fixes) + other +
            "; only pass 2 runs again")


def tuned_record(old_config, opts: IndexOptions) -> dict:
    """The ``tune`` record (grass_index.eval.tune) survives a refit only while the index keeps
    the preconditioner it chose, e.g. through `verify --repair`; any other refit drops it."""
    rec = (old_config or {}).get("tune")
    if not rec:
        return {}
    choice = rec.get("choice", {})
    same = choice.get("hessian") == opts.hessian and (
        opts.hessian == "identity" or choice.get("damping") == damping_key(opts.damping))
    return {"tune": rec} if same else {}


def old_task(old_config) -> dict:
    """The task record of the config a refit replaces (reference and file hash)."""
    old = old_config or {}
    return dict(task=old.get("task"), task_sha256=old.get("task_sha256"))


@dataclasses.dataclass(frozen=True)
class Pass2Run:
    """Where one pass 2 reads its rows, gets its preconditioner and commits — what differs
    between a single process (``finish``) and torchrun (``distributed.merge_ranks``).

    ``rows`` holds this rank's rows (``StoreRows`` or ``distributed.ShardRows``); ``fit()``
    fits the preconditioner (the same on every rank); ``main_store(pre, key)`` is a context
    manager giving rank 0 the open main store to commit into (torchrun creates it from the
    shards); ``stored`` (a single process's main store) is where a preconditioner fitted by an
    interrupted run of the same variant is looked up and the new one kept; ``extra``: records
    that outlive this pass 2 (e.g. `tune`'s choice); ``generation``: a living index's rows
    that count (its removed ids are left out of FAISS); ``template``: the empty FAISS index
    to fill instead of one trained afresh (a grown IVF index keeps its quantizer)."""

    rows: object
    fit: Callable[[], Preconditioner]
    main_store: Callable
    task: object
    item_signature: object
    progress: Callable
    ranks: object = ONE_PROCESS
    stored: object = None
    extra: dict | None = None
    generation: Generation | None = None
    template: Callable | None = None


def run_pass2(out: Path, build: dict, describe: dict, opts: IndexOptions, run: Pass2Run) -> dict:
    """Pass 2, the one implementation behind every build: preconditioner -> FAISS parts ->
    recall -> config.json.

    Every rank (one, or each torchrun rank) fits the same preconditioner, preconditions the
    rows it holds into its own FAISS part(s) copied from one template (rank 0's IVF quantizer /
    float16 scales) and computes the exact top lists of the recall queries over them. Rank 0
    then joins the parts — a single process splits the ids into ``shards=N`` contiguous parts;
    torchrun keeps one part per rank, or merges them into one file — measures recall and
    commits config.json. Every rank returns the config. When the exact index would not fit the
    memory budget, the parts hold a search sketch of each vector (index/choice.py picks its
    width and R from the recall measured while filling) and the joined index re-ranks its
    candidates exactly from the main store."""
    p2 = _Pass2(out, build, opts, run)
    template = run.ranks.share(run.template or p2.template, encode=lambda t: t.to_bytes(),
                               decode=lambda b: VectorIndex.from_bytes(*b))
    template.build_key = p2.key  # written into every part's file: a reader checks it first
    qids, k = recall_queries(p2.n, p2.live)
    queries = np.zeros((len(qids), build["dim"]), np.float32)  # each rank reads its own
    for pos, got in run.ranks.step(lambda: run.rows.query_rows(qids)):
        queries[pos] = got
    measure = k >= 1 and len(p2.widths) * len(p2.reranks) > 1

    p2.qids = qids
    fq = p2.fill_queries(queries, k)  # what the rows are scored against while filling

    def lists():
        return search_choice.SketchTopLists(fq, p2.dim, build["seed"], p2.widths,
                                            (k + 1) * max(p2.reranks))
    filled = run.ranks.step(lambda: p2.fill(template, fq, k, lists() if measure else None))
    tops = [top for _, top, _, _ in filled]
    if measure:
        p2.chosen = _choose(filled, tops, lists(), queries, qids, k, p2.reranks, p2.reason, p2.n)
        if p2.chosen.width != p2.sk.dim:  # the first width missed the target: fill at the chosen
            p2.sk = SearchSketch(p2.dim, p2.chosen.width, build["seed"])
            template = run.ranks.share(p2.template, encode=lambda t: t.to_bytes(),
                                       decode=lambda b: VectorIndex.from_bytes(*b))
            template.build_key = p2.key
            filled = run.ranks.step(lambda: p2.fill(template, fq, k, None))
    zero = zero_layers(build["layout"], [reached for reached, _, _, _ in filled])
    if p2.raw:
        p2.saturated = np.concatenate([sat for _, _, _, sat in filled])

    def rank0_commit():
        with run.main_store(p2.pre, p2.key) as store:
            vindex, files, mine = p2.joined(store)
            if k >= 1:
                recall = measure_recall(vindex, _merged_exact(queries, k, tops), qids, k,
                                        others=p2.parts)
                recall["search"] = p2.chosen.record()
                if p2.sk is not None and recall["recall"] < search_choice.TARGET_RECALL:
                    log.warning("index: recall@%d = %.3f is below the %.2f target (%s); use "
                                "%s for exact search", k, recall["recall"],
                                search_choice.TARGET_RECALL, p2.chosen.reason,
                                option("index", "flat:exact"))
            remove_temp_files(out)
            for part, name in zip(p2.parts[:len(mine)], files):  # the others' are on disk
                part.save(out / name)
            if p2.raw:  # the blocks that score 0, beside the preconditioner they belong to
                store.put_array(saturated_name(p2.key), p2.saturated)
            extra = dict(run.extra or {}, capture=capture_record(build, describe, zero))
            return commit(out, store, build, describe, pre=p2.pre, key=p2.key, vindex=vindex,
                          index=p2.index, index_files=files, hessian=opts.hessian,
                          damping=opts.damping, task=run.task,
                          item_signature=run.item_signature, progress=run.progress,
                          extra=extra, generation=p2.gen)
    return run.ranks.step(lambda: rank0_commit() if run.ranks.rank == 0 else None)[0]


class _Pass2:
    """The state one rank's pass 2 carries between its steps: the variant (index spec, key),
    the preconditioner, the search sketch, its FAISS parts."""

    def __init__(self, out: Path, build: dict, opts: IndexOptions, run: Pass2Run):
        self.out, self.build, self.run, self.opts = out, build, run, opts
        self.n, self.dim = build["n_train"], build["dim"]
        self.gen = run.generation or Generation.initial(self.n)
        self.live = self.gen.live_mask() if self.gen.removed else None  # None: every id
        spec = parse_spec(opts.index)
        if run.ranks.world > 1 and spec.shards > 1:  # torchrun: one part per rank
            spec = spec._replace(shards=run.ranks.world)
        self.spec, self.index = spec, str(spec)  # canonical: the same index under any spelling
        self.key = pass2_key(build, hessian=opts.hessian, damping=opts.damping,
                             index=self.index, nlist=opts.nlist, nprobe=opts.nprobe,
                             generation=self.gen.record())
        self.pre = self._preconditioner()
        # exact search when the vectors fit the memory budget, else a search sketch whose width
        # and re-rank factor the recall measured while filling decides (index/choice.py)
        self.widths, self.reranks, self.reason = search_choice.candidates(spec, self.dim,
                                                                          self.gen.n_live)
        self.sk = SearchSketch(self.dim, self.widths[0], build["seed"]) if self.widths else None
        # an exact float32 index in one part is a scan of the store's own rows (index/store_scan.py)
        self.in_store = self.sk is None and search_choice.scans_store(
            spec, form_bytes(self.pre), self.dim, self.gen.n_live)
        # rows taken raw, queries preconditioned instead: the store scan, and a search sketch
        # (FAISS holds S·ĝ: never multiplied by an inverse, unchanged by a refit)
        self.raw = self.in_store or (self.sk is not None and spec.kind == "flat"
                                     and spec.dtype == "float32")
        self.qids, self.saturated = np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
        self.chosen = search_choice.Choice(self.sk and self.sk.dim,
                                           self.reranks[0] if self.reranks else 0, self.reason)
        # a single process splits the ids into contiguous parts; a rank indexes all it holds
        self.ranges = part_ranges(self.n, spec.shards) if run.ranks.world == 1 else [(0, self.n)]
        self.names = index_file_names(self.key, len(self.ranges) * run.ranks.world)
        self.parts: list = []

    def _preconditioner(self) -> Preconditioner:
        """The variant's stored preconditioner (a resumed pass 2), else a fresh fit (kept)."""
        stored, layout = self.run.stored, self.build["layout"]
        pre = None if stored is None else _stored_preconditioner(
            stored, self.key, layout, rows=lambda: stored.get_rows(self.gen.live_ids()))
        if pre is None:
            pre = self.run.fit()
            if stored is not None:
                save_preconditioner(stored, self.key, pre)
        return pre

    def stored_form(self, vec: np.ndarray) -> np.ndarray:
        """What FAISS holds of a row as the fill scores it (its search sketch, if any)."""
        return vec if self.sk is None else self.sk(vec)

    def template(self) -> VectorIndex:
        with self.run.rows.open() as st:
            blocks = ((s, self.stored_form(v)) for s, v in self.live_blocks(st))
            return make_template(blocks, self.spec, self.dim if self.sk is None else self.sk.dim,
                                 self.opts.nlist, self.opts.nprobe)

    def live_blocks(self, st):
        """(start id, preconditioned rows) of this generation, removed ids left out (their
        rows then no longer follow ``start``: only ``template`` reads them so)."""
        for start, vec in preconditioned_blocks(st, self.pre, limit=self.n):
            yield start, (vec if self.live is None else vec[self.live[start:start + len(vec)]])

    def fill(self, template: VectorIndex, queries: np.ndarray, k: int, lists=None):
        """This rank's rows into its FAISS parts (none for the store scan) and the recall
        queries' exact top lists over them, and with ``lists`` (index/choice.py) each
        candidate search sketch's: ({layer: reached by a nonzero vector}, (scores, ids) or
        None, sketched tops or None, the saturated (id, layer) pairs of raw rows, else None).
        ``queries`` are ``fill_queries``': raw against preconditioned rows, preconditioned
        against raw ones (``raw``: nothing here multiplies a row by an inverse)."""
        layout = self.build["layout"]
        parts = [] if self.in_store else [template.empty_like() for _ in self.ranges]
        exact = ExactTopK(queries, k + 1) if k >= 1 else None
        reached, saturated = dict.fromkeys(layer_slices(layout), False), []
        slices = list(layer_slices(layout).values())
        with self.run.rows.open() as st:
            for start, vec, ids in self.rows_of(st, saturated):
                for name, sl in zip(reached, slices):
                    reached[name] = reached[name] or bool(vec[:, sl].any())
                if parts:
                    self.add_to_parts(parts, self.stored_form(vec), ids)
                if exact is not None:
                    exact.add(vec, ids)
                if lists is not None:
                    lists.add(vec, ids)
                self.run.progress("index", start + len(vec), st.num_rows)
        rank = self.run.ranks.rank
        if parts and rank != 0:  # rank 0 keeps its part in memory; the others hand it over
            parts[0].save(self.out / self.names[rank])
        self.parts = parts
        return (reached, None if exact is None else (exact.scores, exact.ids),
                None if lists is None else lists.state(),
                (np.concatenate(saturated) if saturated else np.zeros((0, 2), np.int64))
                if self.raw else None)

    def rows_of(self, st, saturated: list):
        """(start id, rows as the fill scores them, their training ids) of this rank, removed
        ids left out: preconditioned, or raw with each saturated block (below 1e-30) set to 0
        and its (id, layer) appended to ``saturated``."""
        layout = self.build["layout"]
        slices, starts = list(layer_slices(layout).values()), starts_of(layout)
        blocks = chunks(st, limit=self.n) if self.raw else \
            preconditioned_blocks(st, self.pre, limit=self.n)
        for start, vec in blocks:
            ids = self.run.rows.global_ids(start, len(vec))
            if self.live is not None:  # removed examples: never indexed or scored
                vec, ids = vec[self.live[ids]], ids[self.live[ids]]
            if self.raw:
                sat = saturated_blocks(vec, starts)
                zero_blocks(vec, sat, slices)
                saturated.append(np.column_stack([ids[sat[:, 0]], sat[:, 1]]))
            yield start, vec, ids

    def add_to_parts(self, parts: list, held: np.ndarray, ids: np.ndarray) -> None:
        """Rows (as FAISS holds them) into the part whose id range holds each."""
        for part, (lo, hi) in zip(parts, self.ranges):
            mine = (ids >= lo) & (ids < hi)
            if mine.any():
                part.add(held[mine], ids[mine])

    def fill_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The recall queries as the fill scores rows against them: raw (FAISS holds
        preconditioned rows), or, with raw rows (``raw``), preconditioned — a damping that
        takes them out of float32 is refused here, naming those training ids."""
        if not self.raw or k < 1:
            return queries
        pq, under, over = precondition_queries(self.pre, queries, self.dim)
        if len(under) or len(over):
            raise damping_refused(self.pre, self.qids[under if len(under) else over][:5]
                                  .tolist(), "under" if len(under) else "over")
        return pq

    def joined(self, store):
        """Rank 0: every rank's parts as the one index that serves (re-ranking from ``store``
        for a two-stage index), its file names and the parts this process holds."""
        if self.in_store:
            vindex = StoreScan(held_open(store), lambda: self.pre, dim=self.dim,
                               live=self.gen.live_mask(), saturated=self.saturated,
                               build_key=self.key)
            check_count(vindex, self.gen.n_live)
            return vindex, [], []
        mine, world = self.parts, self.run.ranks.world
        parts = mine + [VectorIndex.load(self.out / self.names[r]) for r in range(1, world)]
        files = self.names
        if world > 1 and self.spec.shards == 1:  # one file, as a single process writes
            for p in parts[1:]:
                parts[0].merge_from(p)
            parts, files = parts[:1], index_file_names(self.key, 1)
        for p in parts:
            p.build_key = self.key
        self.parts = parts
        vindex = parts[0] if len(parts) == 1 else ShardedIndex(parts)
        if self.sk is not None and self.raw:  # queries preconditioned, rows raw
            vindex = SketchedIndex(vindex, self.sk, self.chosen.rerank, raw_rows=True
                                   ).with_rerank(raw_rerank(store, self.build["layout"],
                                                            self.saturated),
                                                 lambda q: checked_queries(self.pre, q, self.dim))
        elif self.sk is not None:
            vindex = SketchedIndex(vindex, self.sk, self.chosen.rerank).with_rerank(
                store_rerank(store, self.pre))
        check_count(vindex, self.gen.n_live)
        return vindex, files, mine


def zero_layers(layout: dict, reached: list[dict]) -> list[str]:
    """The layers whose preconditioned vector is zero for every training example on every rank
    (preconditioning maps zero rows to zero, and a saturated block is stored as 0), refusing
    an index where that is every layer: it could say nothing."""
    zero = [name for name in layout if not any(r[name] for r in reached)]
    if zero and len(zero) == len(layout):
        raise AttributionError(says_nothing(layout))
    return zero


def says_nothing(layout: dict) -> str:
    """Why an index whose every vector is zero is not written."""
    layers = ", ".join(list(layout)[:6]) + (", ..." if len(layout) > 6 else "")
    return ("every training example's gradient is zero (or below float32's range) in every "
            f"selected layer ({layers}): the index could only give every example the score 0.0 "
            "and an arbitrary top-k, so it is not written. Check that the loss depends on these "
            "layers' parameters (" + spelled("`grass-index build TASK --check`",
                                             "check_capture(...)") + " shows how each is "
            "captured) and that the model is not saturated on every example (loss 0 everywhere)")


def capture_record(build: dict, describe: dict, zero: list[str]) -> dict:
    """config.json's ``capture``: the trainable parameters the layer selection left out (and
    why), the layers the first-batch check moved to torch.func (with its note), and the
    layers whose gradient is zero for every training example (dropped from the
    preconditioner: they add nothing to any score)."""
    moved = {}
    for name, d in describe.items():
        notes = [str(n) for n in d.get("notes") or [] if str(n).startswith(MOVED_NOTE)]
        if notes and d.get("kind") != "flat":
            moved[name] = notes[0]
    return dict(left_out=dict(build.get("left_out") or {}), moved_to_flat=moved,
                zero_gradient=list(zero))


def pass2_key(build: dict, *, hessian, damping, index, nlist, nprobe, generation=None) -> str:
    """Names this pass 2's preconditioner and index files (a variant of the same sketches;
    a living index's generation record makes every generation's files new ones)."""
    key = dict(hessian=hessian, damping=damping_key(damping), index=index, nlist=nlist,
               nprobe=nprobe, sketch=hash_json(build))
    if generation is not None:
        key["generation"] = generation
    return hash_json(key)[:12]


def remove_temp_files(out: Path) -> None:
    """Temp files of a writer killed mid-save (an index can be GBs). Only called while holding
    the store's writer lock, so no live process is writing any of them."""
    remove_stale_temps(out)
    for name in os.listdir(out):
        unlink_owned(out, name, _OLD_TEMPS)


def commit(out: Path, store, build: dict, describe: dict, *, pre, key: str, vindex,
           index: str, index_files: list[str], hessian: str, damping, task,
           item_signature, progress, extra=None, generation: Generation | None = None) -> dict:
    """Write config.json — the commit point of the whole build — then drop older variants.
    ``extra``: records that outlive this pass 2 (e.g. `tune`'s choice); ``generation``: a
    living index's (recorded from generation 1 on)."""
    cfg = dict(build)
    cfg.update(extra or {})
    if generation is not None and generation.record() is not None:
        cfg["generation"] = generation.record()
    cfg.update(task=(task or {}).get("task"), task_sha256=(task or {}).get("task_sha256"))
    cfg.update(
        library="grass-index", version=__version__, torch=torch.__version__,
        hessian=hessian, damping=damping_key(damping), damping_used=pre.damping_used,
        preconditioner=jsonable(pre.describe()), preconditioner_key=key,
        layers_described=describe, index=jsonable(vindex.describe()), index_kind=index,
        index_file=index_files[0] if index_files else None, index_files=index_files,
        n_blocks=n_batches(build),
        sketch_hash=hash_json(build), item_signature=item_signature,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    cfg = jsonable(cfg)
    cfg["config_hash"] = config_hash(cfg)
    store.put_meta("config", cfg)
    write_json(out / CONFIG_FILE, cfg)  # the commit point of the whole build
    for name in os.listdir(out):  # older preconditioning variants (regular files only)
        if name not in index_files:
            unlink_owned(out, name, INDEX_FILE)
    for name in stale_preconditioner_arrays(store.array_names(), key):  # theirs (k×k per layer)
        store.delete_array(name)
    progress("done", 1, 1)
    return cfg


def refit(path: Path, config: dict, opts: IndexOptions, *, progress=False,
          tune: dict | None = None) -> dict:
    """Pass 2 again over a finished index's stored sketches (another damping, Hessian or
    index kind); the new config (``tune``: see ``finish``)."""
    prog = Progress(progress)
    try:
        with SketchStore.open(path / STORE_DIR, readonly=False) as store:
            # the store's own creation record, not build.json (which another build may have
            # overwritten): it is what the stored sketches are
            build = stored_build_record(store, record_number(config))
            return finish(path, store, build, config.get("layers_described", {}),
                          opts, task=None, progress=prog, old_config=config, tune=tune,
                          again="refit")
    finally:
        prog.close()


def _stored_preconditioner(store, key: str, layout: dict, rows=None):
    """The preconditioner pass 2 already stored under ``key``, or None when there is none or it
    is damaged (non-finite, unreadable): then it is fitted again from the cached Fisher.
    ``rows``: the rows its low-rank layers were fitted on (a living index's rows that count)."""
    name = f"precond/{key}"
    try:
        pre = load_preconditioner(store, key, layout, rows=rows)
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
    if hessian != "eFIM" or not dense or has_fisher(store, dense):
        return None
    return ChunkedFisher(layout, only=dense)


def fit_from_sums(acc: FisherAccumulator, layout, hessian: str, damping) -> Preconditioner:
    """The preconditioner from Fisher sums every layer has (torchrun's all-reduced sums), one
    layer's F_l at a time. ``damping`` as config.json records it ("auto", a number or "abs:λ",
    or None: 0.3 × mean eigenvalue, what an index built before "auto" records)."""
    if hessian != "eFIM":
        return Preconditioner.fit({}, layout, hessian=hessian)
    return Preconditioner.fit_layers(layout, damping=damping, n=0, take_fisher=acc.fisher)


def fit_streaming(store, layout, hessian: str, damping, progress,
                  fisher: ChunkedFisher | None = None,
                  generation: Generation | None = None) -> Preconditioner:
    """The preconditioner, one layer at a time: layers with n < k in the low-rank form from the
    stored rows, the others from Σ ĝĝᵀ — pass 1's sums, the cached Fisher, or a re-read of the store
    — cached as each is taken, then factored in place. EK-FAC: from the Kronecker factors pass 1
    kept (``factors.fit_ekfac``). ``generation``: the rows that count (a living index's: its
    removed ids leave the Fisher; default every stored row)."""
    if hessian == "ekfac":
        return fit_ekfac(store, layout, damping, progress)
    if hessian != "eFIM":
        return Preconditioner.fit({}, layout, hessian=hessian)
    gen = generation or Generation.initial(store.num_rows)
    n = gen.n_live
    dense = dense_layers(layout, n)
    if fisher is not None and (fisher.next_id != n or gen.number):  # nothing left to sketch
        fisher = None
    tick = lambda done, total: progress("fisher", done, total)  # noqa: E731
    rows = lambda: store.get_rows(gen.live_ids())  # noqa: E731  (only when n < k: small)
    if dense and fisher is None and has_fisher(store, dense, gen):
        def take(name):
            return np.array(store.get_array(f"fisher/{name}"), dtype=np.float64)
        return Preconditioner.fit_layers(layout, damping=damping, n=n, take_fisher=take,
                                         rows=rows, progress=tick)
    acc = None
    if dense:
        acc = fisher.finish() if fisher is not None else accumulate(
            store, layout, lambda done: progress("fisher", done, n), only=dense, generation=gen)
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
        store.put_meta("fisher_generation", gen.tag)
        store.put_meta("fisher_done", True)  # last: a pass killed half-way recomputes
    return pre


def has_fisher(store, layout, generation: Generation | None = None) -> bool:
    """The cached F_l of every layer in ``layout`` is there, complete, and of ``generation``
    (a living index caches each generation's; an add killed after caching the next one's
    leaves a cache the current generation must not take)."""
    tag = 0 if generation is None else generation.tag
    return (bool(store.get_meta("fisher_done", False))
            and store.get_meta("fisher_generation", 0) == tag
            and (generation is None or store.get_meta("fisher_n", None) == generation.n_live)
            and all(store.has_array(f"fisher/{k}") for k in layout))


def accumulate(store, layout, progress=None, only=None,
               generation: Generation | None = None) -> FisherAccumulator:
    """Σ ĝĝᵀ and n over every row of a store (``generation``'s rows that count), in id
    order (the chunks pass 1 would use, so the sums are bit-identical to pass 1's)."""
    acc = ChunkedFisher(layout, only=only)
    live = None if generation is None else generation.live_mask()
    for start, rows in store.iter_blocks():
        if live is not None:
            if start >= len(live):
                break
            rows = rows[live[start:start + len(rows)]]
        acc.add(start if live is None else acc.next_id, rows)
        if progress is not None:
            progress(acc.next_id)
    return acc.finish()


def put_fisher(store, acc: FisherAccumulator) -> None:
    """Cache F_l (e.g. summed from shards) where pass 2 looks first, one layer at a time; the
    flag goes last, so a pass killed half-way recomputes instead of trusting a partial cache."""
    for k in acc.names:
        store.put_array(f"fisher/{k}", acc.fisher(k))
    store.put_meta("fisher_n", int(acc.n))
    store.put_meta("fisher_done", True)


# --- two-stage search ------------------------------------------------------------------------

def _merged_exact(queries, k: int, tops) -> ExactTopK:
    exact = ExactTopK(queries, k + 1)
    for scores, ids in tops:
        exact.merge(scores, ids)
    return exact


def _choose(filled, tops, lists, queries, qids, k: int, reranks, reason: str, n: int):
    """The search (index/choice.py) from every rank's sketched and exact top lists."""
    for _, _, state, _ in filled:
        lists.merge(state)
    chosen = search_choice.choose(lists, _merged_exact(queries, k, tops).result()[1], qids, k,
                                  reranks, reason, n)
    log.info("index: search sketch width %d, rerank %d: predicted recall@%d %.3f (%s)",
             chosen.width, chosen.rerank, k, chosen.predicted, chosen.reason)
    return chosen


def check_count(vindex, n: int) -> None:
    if vindex.ntotal != n:
        raise AttributionError(f"index holds {vindex.ntotal} vectors for {n} "
                               "training examples; the sketch store is inconsistent — run "
                               + spelled("grass-index verify", "grass_index.verify_index"))


def form_bytes(pre: Preconditioner) -> float:
    """Bytes of the arrays a query reads to precondition itself (every layer's form)."""
    return float(sum(np.asarray(a).nbytes for f in (pre.forms or {}).values()
                     for a in f.arrays().values()))
