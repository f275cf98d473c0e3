"""The public API: build_index / build_shard / merge_shards / open_index / AttributionIndex.

A façade over ``grass_index.pipeline``, which owns the build end to end (one process,
`--worker I/N` shards + merge, torchrun) and the query side; see docs/design.md for the data
flow and the layout of an index directory. verify_index and describe_index are re-exported.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .analysis.normalize import check_normalize, cosine_index, cosine_scores, unit_rows
from .analysis.self_influence import self_influence
from . import arguments
from .errors import GrassIndexError, spelled  # noqa: F401  (the base of AttributionError, ...)
from .indexdir import IndexRecord, read_record
from .pipeline import (AttributionError, BuildOptions, BuildResult, CaptureCheck, IndexConfig,
                       IndexOptions, ShardInfo)
from .pipeline import run as pipeline_run
from .eval.tune import tune_index
from . import living
from .query import querying
from .task import Task, task_flags, task_for_index, task_record
# Re-exported: public API and names tools import from here (the directory layout, the config
# hash, the preconditioner state codec).
from .pipeline import (BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, HESSIANS, INDEX_KINDS,  # noqa: F401
                       config_hash, describe_index, state_from_array, state_to_array)
from .pipeline import verify_index as verify_directory

log = logging.getLogger("grass_index")


# ------------------------------------------------------------------------------- build

def build_index(model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, out,
                sparsification: str = "random_mask-128*128", projection: str = "sjlt-4096",
                hessian: str = "eFIM", damping="auto", batch_size: int = 32, seed: int = 0,
                layers: list[str] | str | None = None, collate: Callable | None = None,
                index: str = "flat", task: str | None = None, progress=True, device=None,
                nlist: int | None = None, nprobe: int | None = None,
                selective_mask=None, worker=None, distributed: bool | None = None,
                remove_shards: bool = False, check_only: bool = False,
                workers: int | None = None) -> "AttributionIndex":
    """Sketch every training example (pass 1, resumable), precondition (pass 2), index.

    ``workers``: DataLoader processes that read and collate pass 1's batches ahead of the
    sketching (default: by CPU count, none on 2 cores; 0: in this process); the batches and
    sketches are the same for any count.

    ``distributed`` (default: when torchrun's environment or an initialised process group has
    more than one rank) makes every rank sketch its shard and sum its Fisher, the sums are
    all-reduced, then pass 2 runs spread over the ranks (``remove_shards`` deletes the shards
    afterwards: they double the disk); every rank returns the finished index, and
    ``index.reporting`` is True on the one that should report it. The sketches equal a
    single-process build's bit for bit and the scores to float64 rounding.

    ``selective_mask`` is a file from `grass-index selective-mask fit`, needed by
    ``selective_mask-…`` specs; it is copied into ``out`` so queries need only the directory.

    ``damping``: "auto" (the default: λ_l from each layer's spectrum, recorded as "auto"), a
    relative factor (× mean eigenvalue of F_l, e.g. 0.3) or "abs:λ" (docs/damping.md).

    Re-running with the same ``out`` resumes an interrupted build; with another ``damping``,
    ``hessian`` or ``index`` it re-preconditions from the stored sketches (no gradients).

    ``model`` may be a list of checkpoints of one architecture (a task's ``checkpoints()``):
    a checkpoint ensemble, whose scores are the mean over checkpoints of each one's influence
    (grass_index/capture/ensemble.py); query and score it with the same list, in order.

    Always returns the finished index. The capture check alone is :func:`check_capture`, one
    worker's shard :func:`build_shard` (``check_only=`` and ``worker=`` are refused with
    that pointer: they returned a report or a dict instead of an index).
    """
    if check_only:
        raise AttributionError("build_index(check_only=True) is gone: call "
                               "grass_index.check_capture(model, train_data, loss_fn, "
                               "BuildOptions(...)), which returns the capture report")
    if worker is not None:
        raise AttributionError("build_index(worker=...) is gone: call grass_index.build_shard("
                               "model, train_data, loss_fn, out, worker, BuildOptions(...), "
                               "IndexOptions(...)), which returns the shard's ShardInfo")
    index_options = IndexOptions(hessian=hessian, damping=damping, index=index, nlist=nlist,
                                 nprobe=nprobe)
    out = arguments.directory(out, "build_index", "out")
    if distributed is not True and living.grows(out, train_data):  # data grew at the end
        return AttributionIndex._from_result(living.add_examples(
            out, model, train_data, loss_fn, collate=collate, progress=progress, device=device,
            workers=workers, task=_record_of(task), options=index_options,
            distributed=distributed))
    living.settle(out)  # a finished index's build.json is its generation's (after a kill)
    options = BuildOptions(sparsification=sparsification, projection=projection, seed=seed,
                           layers=layers, batch_size=batch_size, selective_mask=selective_mask,
                           workers=workers)
    if distributed is not True and living.same_data(out, model, train_data, loss_fn, options,
                                                    collate=collate, device=device):
        idx = open_index(out)  # a grown index over its own data: pass 2's options may differ
        rec = idx.record
        wanted = (index_options.hessian, None if damping is None else str(damping),
                  index_options.index)
        if wanted != (rec.hessian, rec.damping, rec.index_kind):
            idx.reprecondition(damping, index_options.hessian, index_options.index, progress)
        return idx
    res = pipeline_run.build(model, train_data, loss_fn, out, options, index_options,
                             task=_record_of(task),
                             collate=collate, progress=progress, device=device,
                             distributed=distributed, remove_shards=remove_shards)
    return AttributionIndex._from_result(res)


def add_examples(path, model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, *,
                 collate: Callable | None = None, progress=True, device=None,
                 retrain: bool = False, workers: int | None = None,
                 task: str | None = None, distributed: bool | None = None
                 ) -> "AttributionIndex":
    """Grow the index in ``path`` by the examples ``train_data`` has beyond it (data that grew
    at the end: every indexed example unchanged, the same model and settings). Only the new
    examples are sketched; the Fisher gains their rows, the preconditioner is refitted (a
    recorded damping rule, e.g. ``auto``, is evaluated on the new spectrum) and FAISS holds
    every row again — a new generation, committed atomically. An IVF index keeps its
    quantizer (a warning says when the new rows drift from it) unless ``retrain``.
    ``build_index`` over grown data into the same directory does the same. ``task``: the
    task (reference) the grown data comes from, recorded like a build's.

    ``distributed`` (default: under torchrun with more than one rank): every rank sketches
    its share of the new examples, then rank 0 commits the generation; every rank returns
    the index, ``reporting`` on rank 0. One worker's share alone is :func:`add_shard`."""
    path = arguments.directory(path, "add_examples")
    return AttributionIndex._from_result(living.add_examples(
        path, model, train_data, loss_fn, collate=collate, progress=progress, device=device,
        retrain=retrain, workers=workers, task=_record_of(task), distributed=distributed))


def add_shard(path, model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, worker,
              *, collate: Callable | None = None, progress=True, device=None,
              retrain: bool = False, workers: int | None = None,
              task: str | None = None) -> ShardInfo:
    """`add --worker I/N`: sketch only worker I's share of the examples ``train_data`` has
    beyond the index in ``path`` (the batches b with b % N == I, as :func:`add_examples`
    cuts them) into ``path/adds/I-of-N/`` (resumable); the index is unchanged. Once all N
    shards exist, :func:`merge_shards` commits the next generation: the same sketches, bit
    for bit, and scores as :func:`add_examples` in one process. Shards made for another
    generation or other new data are refused, naming the fix."""
    path = arguments.directory(path, "add_shard")
    return living.add_shard(path, model, train_data, loss_fn, worker, collate=collate,
                            progress=progress, device=device, retrain=retrain,
                            workers=workers, task=_record_of(task))


def remove_examples(path, ids: Sequence[int], *, progress=False) -> "AttributionIndex":
    """Remove training examples ``ids`` from the index in ``path`` (a new generation): they
    leave the Fisher (their sketches' contribution subtracted, the preconditioner refitted)
    and FAISS, and are never returned by query, score (their column is 0.0),
    self-influence (NaN, never ranked) or serve. Ids never shift."""
    path = arguments.directory(path, "remove_examples")
    living.remove_examples(path, ids, progress=progress)
    return open_index(path)


def _record_of(task) -> dict | None:
    """What config.json records about the task (its reference and file hash)."""
    return None if task is None else task_record(task)


def check_capture(model: torch.nn.Module, train_data: Sequence, loss_fn: Callable,
                  options: BuildOptions | None = None, *, collate: Callable | None = None,
                  device=None) -> CaptureCheck:
    """`grass-index build --check`: check how every selected layer is captured on the first
    examples, without building anything. The report's ``layers`` rows say each layer's route
    (factored, flat, moved-to-flat) and status; ``ok`` is False when a layer cannot be
    captured exactly by any route, and ``failed`` names it with the --layers glob that
    excludes it."""
    return pipeline_run.check_capture(model, train_data, loss_fn, options, collate=collate,
                                      device=device)


def build_shard(model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, out, worker,
                options: BuildOptions | None = None, index_options: IndexOptions | None = None,
                *, task: str | None = None, collate: Callable | None = None, progress=True,
                device=None) -> ShardInfo:
    """`build --worker I/N`: sketch only worker I's batches (b % N == I) into
    ``out/shards/I-of-N/`` without pass 2; once all N shards exist, :func:`merge_shards`
    finishes the index. ``index_options`` are recorded for the merge.

    Into a finished index whose training data grew at the end (the same model and settings,
    every indexed example unchanged) it refuses, naming :func:`add_shard`: the split add
    sketches only the new examples."""
    out = arguments.directory(out, "build_shard", "out")
    options = arguments.options(options, BuildOptions, "build_shard", "options")
    living.refuse_grown_shard(out, model, train_data, loss_fn, worker, options,
                              collate=collate, device=device, task=task_flags(task))
    return pipeline_run.build_shard(model, train_data, loss_fn, out, worker, options,
                                    index_options, task=_record_of(task), collate=collate,
                                    progress=progress,
                                    device=device)


def merge_shards(out, *, shards: int | None = None, hessian: str | None = None, damping=None,
                 index: str | None = None, progress=True,
                 remove_shards: bool = False) -> "AttributionIndex":
    """Finish a build made by :func:`build_shard` for i = 0..n-1, or an add made by
    :func:`add_shard` (when ``out`` holds add shards).

    Checks that every shard exists, is complete and is the same build (clear errors for
    missing, incomplete, duplicate and mismatched shards), copies them into the main store in
    batch order and runs pass 2. ``hessian``/``damping``/``index`` default to what the workers
    were given (an add: the recorded ones). Resumable; ``remove_shards`` deletes
    ``out/shards`` once the index is written (an add's shards are always deleted once its
    generation is committed).
    """
    out = arguments.directory(out, "merge_shards", "out")
    if living.pending(out):  # an add's shards (a build's go in out/shards)
        return AttributionIndex._from_result(living.merge_added(
            out, n=shards, overrides=dict(hessian=hessian, damping=damping, index=index),
            progress=progress))
    return AttributionIndex._from_result(pipeline_run.merge_shards(
        out, shards=shards, hessian=hessian, damping=damping, index=index, progress=progress,
        remove_shards=remove_shards))


def verify_index(path, *, repair: bool = False, sample: int = 64, seed: int = 0,
                 fast: bool = False, task=None) -> dict:
    """Check an index directory part by part; with ``repair`` rebuild what its store can
    (grass_index.pipeline.repair.verify_index). ``task`` (a reference or a loaded task: the
    one the index was built from) lets repair re-sketch blocks damaged on disk."""
    if repair and task is not None and not isinstance(task, Task):
        task = _named_task(path, task)
    return verify_directory(path, repair=repair, sample=sample, seed=seed, fast=fast, task=task)


def _named_task(path, task) -> Task:
    """The task the user named for a repair, loaded and checked against what the index
    records like a query's (task.task_for_index: an hf-lm index's recorded paths must be the
    named ones); an unreadable config.json (repair restores it) records nothing to compare."""
    try:
        rec = read_record(Path(path))
        recorded, sha256 = rec.task, rec.task_sha256
    except GrassIndexError:
        recorded = sha256 = None
    return task_for_index(str(task), recorded=recorded, sha256=sha256, index_dir=path,
                          command=spelled("verify --repair", "verify_index(repair=True)"))[0]


# ------------------------------------------------------------------------------- open

def open_index(path, *, mmap: bool = True) -> "AttributionIndex":
    """Open a finished index directory (read-only) for query/score/info. ``mmap``: FAISS's
    vectors memory-mapped, not read into memory (a 3.2 GB exact index opens in milliseconds
    instead of seconds, and processes reading one index share its pages;
    benchmarks/query_open.py)."""
    path = arguments.directory(path, "open_index")
    return AttributionIndex(path, read_record(path), mmap=mmap)


SNAPSHOT_TRIES = 5  # loads of one search: the first, then one per config replaced meanwhile


class AttributionIndex:
    """A built index: ``query`` (top-k proponents/opponents) and ``score`` (full matrix)."""

    def __init__(self, path, record, *, mmap: bool = True, reporting: bool = True):
        """``record``: the index's IndexRecord (a config dict, e.g. what a build returns, is
        checked into one)."""
        self.path = Path(path)
        self.record = record if isinstance(record, IndexRecord) else IndexRecord(
            record, str(self.path / CONFIG_FILE))
        self.reporting = reporting  # False on torchrun ranks other than 0
        self._mmap = mmap
        self._seen = _config_stamp(self.path)
        self._vindex = None
        self._pre = None
        self._cosine = None

    @classmethod
    def _from_result(cls, res: BuildResult) -> "AttributionIndex":
        return cls(res.path, res.config, reporting=res.reporting)

    # -- properties -------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """config.json as written (a copy; ``record`` / ``settings`` is the typed form)."""
        return dict(self.record.raw)

    @property
    def n_train(self) -> int:
        return self.record.n_train

    @property
    def dim(self) -> int:
        return self.record.dim

    @property
    def layout(self) -> dict:
        return dict(self.record.layout)

    @property
    def task(self) -> str | None:
        return self.record.task

    @property
    def generation(self) -> int:
        """The generation of the training set this handle reads (0: as built; each add or
        remove makes the next one)."""
        return self.record.generation.number

    @property
    def removed(self) -> tuple[int, ...]:
        """Training ids removed from the index (never returned; their score columns are 0)."""
        return self.record.removed

    def info(self) -> dict:
        return self.config

    @property
    def settings(self) -> IndexConfig:
        """The typed, read-only config (n_train, hessian, index_kind, recall, ...)."""
        return self.record

    def __repr__(self) -> str:
        return (f"AttributionIndex({str(self.path)!r}, n_train={self.n_train}, dim={self.dim}, "
                f"hessian={self.record.hessian})")

    # -- lazily opened parts ------------------------------------------------------------
    def _reread_if_replaced(self) -> bool:
        """A re-precondition (another process or handle) replaced this index's files after
        we read config.json: adopt the new config (same sketches, new preconditioner and
        FAISS) so the next read sees one consistent snapshot; False when nothing changed."""
        try:
            new = read_record(self.path)
        except AttributionError:
            return False
        if new.preconditioner_key == self.record.preconditioner_key:
            return False
        log.info("index %s was re-preconditioned while open; using its new files", self.path)
        self._adopt(new)
        return True

    def refresh(self) -> bool:
        """Pick up the newest generation (an add, a remove or a re-precondition committed by
        another process or handle) if config.json changed since it was read; True when the
        handle now reads a new one. Cheap when nothing changed (one stat)."""
        stamp = _config_stamp(self.path)
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            new = read_record(self.path)
        except AttributionError:
            return False  # mid-replacement or damaged: keep the snapshot we have
        if new.config_hash == self.record.config_hash:
            return False
        log.info("index %s: now generation %d", self.path, new.generation.number)
        self._adopt(new)
        return True

    def _adopt(self, new: IndexRecord) -> None:
        """Read ``new`` from now on: drop every part opened under the record we held."""
        self.record, self._vindex, self._pre, self._cosine = new, None, None, None

    def _with_snapshot(self, load):
        """``load()``, retried on the current config when a re-precondition replaced the files
        the config we hold names — again while another process keeps replacing them (a store
        scan reads the preconditioner per search, so a reader can land in two refits in a
        row), up to SNAPSHOT_TRIES times; each retry follows a new config."""
        for _ in range(SNAPSHOT_TRIES - 1):
            try:
                return load()
            except AttributionError:
                if not self._reread_if_replaced():
                    raise
        return load()

    @property
    def vindex(self):
        return self._with_snapshot(self._load_vindex)

    def _load_vindex(self):
        if self._vindex is None:
            self._vindex = querying.open_vector_index(
                self.path, self.record, mmap=self._mmap,
                preconditioner=self._load_preconditioner)  # the search retries as a whole
        return self._vindex

    @property
    def preconditioner(self):
        return self._with_snapshot(self._load_preconditioner)

    def _load_preconditioner(self):
        if self._pre is None:
            self._pre = querying.load_preconditioner(self.path, self.record)
        return self._pre

    def cosine_index(self):
        """The exact FAISS index of unit-norm training vectors that cosine search uses
        (built from the stored sketches on first use and saved beside the main index)."""
        if self._cosine is None:
            self._cosine = cosine_index(self)
        return self._cosine

    def close(self) -> None:
        self._vindex = self._pre = self._cosine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- query side ----------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module):
        """The model must have the layers (names and shapes) the index was built on."""
        return querying.check_model(self.path, self.record, model)

    def query_sketcher(self, model, device=None):
        """A sketcher bound to ``model``, checked against this index once; pass it as
        ``query_sketches(..., sketcher=)`` to sketch many query batches with one model."""
        return querying.query_sketcher(self.path, self.record, model, device)

    def query_sketches(self, model, examples: Sequence, loss_fn, *, collate=None,
                       batch_size: int | None = None, device=None,
                       sketcher=None) -> torch.Tensor:
        """Raw sketches g(z) [n, K] of the query examples (not preconditioned). For an
        ensemble index ``model`` is the list of its checkpoints and the sketch is their
        concatenation divided by C, so ``search``/``score_sketches`` give the mean score."""
        return querying.sketch_queries(self.path, self.record, model, examples, loss_fn,
                                       collate=collate, batch_size=batch_size,
                                       device=device, sketcher=sketcher)

    def query(self, model, examples: Sequence, loss_fn, k: int = 10, opponents: bool = False,
              *, collate=None, batch_size=None, device=None, nprobe: int | None = None,
              normalize: str | None = None) -> list[list[tuple[int, float]]]:
        """Per example, the k training examples with the largest (or, with opponents=True,
        the most negative) influence score, as (train_id, score) pairs, best first.
        ``nprobe`` (IVF only) overrides the index's number of lists searched.
        ``normalize="cosine"`` ranks by cosine instead (grass_index.analysis.normalize)."""
        if not isinstance(k, int) or k < 1:
            raise AttributionError(f"k must be a positive integer, got {k!r}")
        q = self.query_sketches(model, examples, loss_fn, collate=collate,
                                batch_size=batch_size, device=device)
        return self.search(q, k, opponents=opponents, nprobe=nprobe, normalize=normalize)

    def search(self, q: torch.Tensor, k: int = 10, opponents: bool = False,
               nprobe: int | None = None, normalize: str | None = None):
        """Top-k search with ready-made raw query sketches [n, K]."""
        cosine = check_normalize(normalize) == "cosine"
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int)
                                   or nprobe < 1):
            raise AttributionError(f"nprobe must be a positive integer, got {nprobe!r}")
        if q.shape[0] == 0:
            return []
        k = min(k, self.record.n_live)
        if cosine:  # an exact flat index over unit-norm vectors; nprobe does not apply
            scores, ids = self.cosine_index().search(unit_rows(q.numpy()), k, opponents=opponents)
        else:  # a two-stage index (wide sketches) re-ranks its candidates exactly from the store
            queries = np.ascontiguousarray(q.numpy(), dtype=np.float32)
            # one snapshot: the index and its preconditioner of one config, the whole search
            # retried once on the new config when a re-precondition or a change replaced them
            scores, ids = self._with_snapshot(lambda: querying.search(
                self.path, self._load_vindex(), self._load_preconditioner, queries, k,
                opponents=opponents, nprobe=nprobe))
        scores, ids = np.asarray(scores), np.asarray(ids)
        return [[(int(i), float(s)) for i, s in zip(ids[r], scores[r]) if i >= 0]
                for r in range(len(ids))]

    def train_vectors(self):
        """Yield (start_id, preconditioned rows) from the stored sketches, in id order (the
        removed ids' rows included: ``removed`` names them)."""
        yield from querying.train_vectors(self.path, self.preconditioner, self.n_train)

    def raw_sketches(self):
        """Yield (start_id, raw rows ĝ_i [B, K] float32) from the store, in id order."""
        yield from querying.raw_sketches(self.path, self.n_train)

    def self_influence(self) -> torch.Tensor:
        """float64 [n_train]: ĝ_iᵀ (F + λI)⁻¹ ĝ_i per training example (grass_index.analysis)."""
        return self_influence(self)

    def tune(self, **kwargs):
        """Choose the preconditioner by LDS on a validation split of the task's queries and
        make it this index's (grass_index.eval.tune.tune_index; the task needs train())."""
        return tune_index(self, **kwargs)

    def score(self, model, examples: Sequence, loss_fn, *, collate=None, batch_size=None,
              device=None, normalize: str | None = None) -> torch.Tensor:
        """Exact scores [n_examples, n_train]: g(z)^T (F + lambda I)^-1 g(z_i)
        (``normalize="cosine"``: divided by both vectors' norms)."""
        q = self.query_sketches(model, examples, loss_fn, collate=collate,
                                batch_size=batch_size, device=device)
        return self.score_sketches(q, normalize=normalize)

    def score_sketches(self, q: torch.Tensor, normalize: str | None = None) -> torch.Tensor:
        if check_normalize(normalize) == "cosine":
            return torch.from_numpy(cosine_scores(self, q.numpy()))
        out = torch.empty(q.shape[0], self.n_train, dtype=torch.float32)
        for start, vec in self.train_vectors():
            out[:, start:start + len(vec)] = q @ torch.from_numpy(vec).T
        out[:, list(self.removed)] = 0.0  # a removed example influences nothing
        return out

    # -- maintenance --------------------------------------------------------------------
    def add(self, model, train_data: Sequence, loss_fn, *, collate=None, progress=False,
            device=None, retrain: bool = False) -> "AttributionIndex":
        """Grow this index by the examples ``train_data`` has beyond it
        (:func:`add_examples`); this handle then reads the new generation."""
        living.add_examples(self.path, model, train_data, loss_fn, collate=collate,
                            progress=progress, device=device, retrain=retrain,
                            distributed=False)
        self.refresh()
        return self

    def remove(self, ids: Sequence[int], *, progress=False) -> "AttributionIndex":
        """Remove training examples ``ids`` (:func:`remove_examples`); this handle then reads
        the new generation."""
        living.remove_examples(self.path, ids, progress=progress)
        self.refresh()
        return self

    def reprecondition(self, damping=None, hessian: str | None = None, index: str | None = None,
                       progress=False, *, tune: dict | None = None) -> "AttributionIndex":
        """Refit the preconditioner (and FAISS) from the stored sketches; no gradients.
        ``damping``/``hessian``/``index`` default to what the index records (a damping of
        None, recorded by indexes built before "auto" was the default, keeps meaning 0.3 ×
        mean eigenvalue; pass ``damping="auto"`` to switch such an index to the new default).
        ``tune``: the record of the `tune` sweep that chose these options, kept in the new
        config (``info`` shows it; later refits keep it while the choice stands)."""
        opts = IndexOptions(hessian=hessian or self.record.hessian,
                            damping=self.record.damping if damping is None else damping,
                            index=index or self.record.index_kind)
        self.close()
        self.record = IndexRecord(pipeline_run.refit_index(self.path, self.config, opts,
                                                           progress=progress, tune=tune),
                                  str(self.path / CONFIG_FILE))
        self._seen = _config_stamp(self.path)
        return self


def _config_stamp(path: Path):
    """What changes when config.json is replaced (an atomic rename: a new inode)."""
    try:
        st = (Path(path) / CONFIG_FILE).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
