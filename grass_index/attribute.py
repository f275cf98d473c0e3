"""The pipeline that ties the stages together: build_index / open_index / query / score.

    build_index   check args -> claim the directory (build.json) -> pass 1: sketch every
                  training example into the store (pipeline.sketching, resumable) ->
                  pass 2: Fisher -> preconditioner -> FAISS -> config.json (pipeline.indexing)
    open_index    read and validate config.json (pipeline.config)
    AttributionIndex.query / score / search / reprecondition

The stages themselves, and the layout of an index directory, are in ``grass_index.pipeline``;
verify_index and describe_index are re-exported here as part of the public API.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .capture import GradientSketcher, select_layers
from .compress import load_selective_mask
from .precondition import has_preconditioner, load_preconditioner
from .store import SketchStore, StoreError
from .task import check_loss, default_collate
from .pipeline.errors import AttributionError
from . import plan as _plan
from .pipeline.files import FORMAT_VERSION, MASK_FILE, STORE_DIR, _atomic_write, _jsonable
from .pipeline.fingerprints import _data_signature, _hash, _layer_dims, data_hash, model_hash
from .pipeline import distributed as _distributed
from .pipeline.config import (_check_index, _check_build_args, _check_damping, _claim_out_dir,
                              _damping_key, _norm_hessian, _read_config)
from .pipeline.progress import _Progress
from .pipeline.sharding import _merge, _sketch_shard, parse_worker, read_shard_fisher
from .pipeline.sketching import _sketch_training_set
from .pipeline.stored import _preconditioned_blocks
from .pipeline.indexing import _finish, _refit, load_faiss, pass1_fisher, store_rerank
from .index import SketchedIndex
from .pipeline.querying import _check_model, _query_sketcher, _sketch_queries
# Re-exported: public API (verify_index, describe_index) and names tests and tools import
# from here (the directory layout, the config hash, the preconditioner state codec).
from .pipeline.verify import verify_index  # noqa: F401
from .pipeline.describe import describe_index  # noqa: F401
from .pipeline.files import BUILD_FILE, CONFIG_FILE  # noqa: F401
from .pipeline.fingerprints import config_hash  # noqa: F401
from .pipeline.config import HESSIANS, INDEX_KINDS  # noqa: F401
from .pipeline.stored import _state_from_array, _state_to_array  # noqa: F401

log = logging.getLogger("grass_index")


# ------------------------------------------------------------------------------- build

def build_index(model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, out,
                sparsification: str = "random_mask-128*128", projection: str = "sjlt-4096",
                hessian: str = "eFIM", damping=None, batch_size: int = 32, seed: int = 0,
                layers: list[str] | str | None = None, collate: Callable | None = None,
                index: str = "flat", task: str | None = None, progress=True, device=None,
                nlist: int | None = None, nprobe: int | None = None,
                selective_mask=None, worker=None, distributed: bool | None = None,
                remove_shards: bool = False):
    """Sketch every training example (pass 1, resumable), precondition (pass 2), index.

    ``worker=(i, n)`` (or ``"i/n"``) sketches only worker i's batches (b % n == i) into
    ``out/shards/i-of-n/`` and returns a dict describing that shard, without pass 2; once all
    n shards exist, :func:`merge_shards` finishes the index. ``distributed`` (default: when
    torchrun's environment or an initialised process group has more than one rank) makes every
    rank sketch its shard and sum its Fisher, the sums are all-reduced, then rank 0 merges
    (``remove_shards`` deletes the shards afterwards: they double the disk); every rank returns
    the finished index. Either way the sketches equal a single-process build's bit for bit and
    the scores to float64 rounding.

    ``selective_mask`` is a file from `grass-index selective-mask fit`, needed by
    ``selective_mask-…`` specs; it is copied into ``out`` so queries need only the directory.

    Re-running with the same ``out`` resumes an interrupted build; with another ``damping``,
    ``hessian`` or ``index`` it re-preconditions from the stored sketches (no gradients).
    """
    out = Path(out)
    hessian = _check_build_args(train_data, hessian=hessian, index=index,
                                batch_size=batch_size, damping=damping)
    worker = parse_worker(worker)
    if worker is not None and remove_shards:
        raise AttributionError("remove_shards applies to torchrun builds and merge; a --worker "
                               "build's shard is what merge needs")
    group = None
    if worker is None and _distributed.wanted(distributed):
        group = _distributed.Group()
        if group.world == 1:
            group.close()
            group = None
        else:
            device = group.device(device)
    try:
        return _build(model, train_data, loss_fn, out, sparsification=sparsification,
                      projection=projection, hessian=hessian, damping=damping,
                      batch_size=batch_size, seed=seed, layers=layers, collate=collate,
                      index=index, task=task, progress=progress, device=device, nlist=nlist,
                      nprobe=nprobe, selective_mask=selective_mask, worker=worker, group=group,
                      remove_shards=remove_shards)
    finally:
        if group is not None:
            group.close()


def _build(model, train_data, loss_fn, out: Path, *, sparsification, projection, hessian,
           damping, batch_size, seed, layers, collate, index, task, progress, device, nlist,
           nprobe, selective_mask, worker, group, remove_shards):
    n = len(train_data)
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    collate = collate or default_collate
    model.eval()

    # Everything that can be checked without writing is checked first.
    check_loss(model, train_data, loss_fn, collate, where="loss_fn")
    infos = select_layers(model, layers)
    masks = load_selective_mask(selective_mask) if selective_mask is not None else None
    sketcher = GradientSketcher(model, infos, sparsification=sparsification,
                                projection=projection, seed=seed, clamp=True, device=device,
                                selective_masks=masks)
    describe = _jsonable(sketcher.describe())
    for name, d in describe.items():
        note = "; ".join(map(str, d.get("clamped") or []))
        if note:
            log.info("layer %s: %s", name, note)

    build = dict(format=FORMAT_VERSION, sparsification=sparsification, projection=projection,
                 seed=seed, layers=layers, layer_dims=_layer_dims(infos),
                 layout=sketcher.layout, dim=sketcher.dim, batch_size=batch_size, n_train=n,
                 model_hash=model_hash(model, infos), data_hash=data_hash(train_data),
                 sketch_fingerprint=sketcher.fingerprint())
    if masks is not None:  # only recorded when used, so other builds' hashes are unchanged
        build["selective_mask"] = _hash(masks)
    # -- the plan: refuse before pass 1 what will not fit (RAM now, disk at out) --
    the_plan = _plan.estimate(layer_dims=build["layer_dims"], layout=sketcher.layout, n=n,
                              batch_size=batch_size, hessian=hessian,
                              index_width=_plan_index_width(sketcher.dim, index),
                              index_bytes=2 if "fp16" in str(index) else 4)
    _plan.check_fits(the_plan, out, K_per_layer=max(sketcher.layout.values()), index=str(index))

    def claim():
        _claim_out_dir(out, build)
        if masks is not None:
            _atomic_write(out / MASK_FILE, Path(selective_mask).read_bytes())

    if worker is not None or group is not None:
        records = dict(describe=describe, task=task, item_signature=_data_signature(train_data),
                       finish=dict(hessian=hessian, damping=_damping_key(damping), index=index,
                                   nlist=nlist, nprobe=nprobe))
        prog = _Progress(progress)

        def shard(i, n):
            claim()
            return _sketch_shard(out, (i, n), sketcher, build, train_data=train_data,
                                 loss_fn=loss_fn, batch_size=batch_size, collate=collate,
                                 progress=prog, records=records)
        try:
            if worker is not None:
                return shard(*worker)
            # rank 0 claims the directory first, so the others only compare with its build.json
            group.step(lambda: claim() if group.rank == 0 else None)
            group.step(lambda: shard(group.rank, group.world))
            fisher = None
            if hessian == "eFIM":  # each rank's sums, read inside a step so errors reach all
                mine = {}
                group.step(lambda: mine.setdefault("acc", read_shard_fisher(
                    out, (group.rank, group.world), sketcher.layout)) and None)
                fisher = group.all_reduce_fisher(mine["acc"])
            cfg = _distributed.merge_ranks(group, out, fisher=fisher, progress=prog,
                                           remove_shards=remove_shards)
        finally:
            prog.close()
        return AttributionIndex(out, cfg)

    claim()
    prog = _Progress(progress)
    run = _plan.WithEta(prog, the_plan, sketcher.layout, hessian, log)  # logs plan + ETA
    try:
        store = SketchStore.create(out / STORE_DIR, dim=sketcher.dim, meta=_jsonable(build))
        with store:
            fisher = pass1_fisher(store, sketcher.layout, hessian, n)  # streaming pass 2
            _sketch_training_set(store, sketcher, train_data, loss_fn, batch_size=batch_size,
                                 collate=collate, progress=run, fisher=fisher)
            cfg = _finish(out, store, build, describe, hessian=hessian, damping=damping,
                          index=index, nlist=nlist, nprobe=nprobe, task=task, progress=run,
                          data=train_data, fisher=fisher)
    finally:
        prog.close()
    return AttributionIndex(out, cfg)


def _plan_index_width(K: int, index) -> int:
    """Floats per vector FAISS will hold for this index spec."""
    return _plan.index_width(K, index)


def merge_shards(out, *, shards: int | None = None, hessian: str | None = None, damping=None,
                 index: str | None = None, progress=True,
                 remove_shards: bool = False) -> "AttributionIndex":
    """Finish a build made by ``build_index(..., worker=(i, n))`` for i = 0..n-1.

    Checks that every shard exists, is complete and is the same build (clear errors for
    missing, incomplete, duplicate and mismatched shards), copies them into the main store in
    batch order and runs pass 2. ``hessian``/``damping``/``index`` default to what the workers
    were given. Resumable; ``remove_shards`` deletes ``out/shards`` once the index is written.
    """
    if hessian is not None:
        hessian = _norm_hessian(hessian)
    if index is not None:
        _check_index(index)
    if damping is not None:
        _check_damping(damping)
    out = Path(out)
    prog = _Progress(progress)
    try:
        cfg = _merge(out, n=shards, hessian=hessian, damping=_damping_key(damping),
                     index=index, progress=prog, remove_shards=remove_shards)
    finally:
        prog.close()
    return AttributionIndex(out, cfg)


# ------------------------------------------------------------------------------- open

def open_index(path, *, mmap: bool = False) -> "AttributionIndex":
    """Open a finished index directory (read-only) for query/score/info."""
    path = Path(path)
    return AttributionIndex(path, _read_config(path), mmap=mmap)


class AttributionIndex:
    """A built index: ``query`` (top-k proponents/opponents) and ``score`` (full matrix)."""

    def __init__(self, path, config: dict, *, mmap: bool = False):
        self.path = Path(path)
        self.config = config
        self._mmap = mmap
        self._vindex = None
        self._pre = None

    # -- properties -------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return int(self.config["n_train"])

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    @property
    def layout(self) -> dict:
        return dict(self.config["layout"])

    @property
    def task(self) -> str | None:
        return self.config.get("task")

    def info(self) -> dict:
        return dict(self.config)

    def __repr__(self) -> str:
        return (f"AttributionIndex({str(self.path)!r}, n_train={self.n_train}, dim={self.dim}, "
                f"hessian={self.config['hessian']})")

    # -- lazily opened parts ------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self):
        """The sketch store, opened only for the duration of one operation (so a writer in this
        process, e.g. reprecondition on another handle, is never blocked by an idle reader)."""
        try:
            store = SketchStore.open(self.path / STORE_DIR, readonly=True)
        except StoreError as e:
            raise AttributionError(f"cannot open the sketch store of {self.path}: {e}") from e
        try:
            yield store
        finally:
            store.close()

    @property
    def vindex(self):
        if self._vindex is None:
            names = self.config.get("index_files") or [self.config["index_file"]]
            f = self.path / names[0] if len(names) == 1 else self.path
            for name in names:
                if not (self.path / name).is_file():
                    raise AttributionError(f"{self.path / name} is missing; run `grass-index "
                                           f"verify {self.path} --repair` to rebuild it from "
                                           "the stored sketches")
            try:
                self._vindex = load_faiss(self.path, self.config, mmap=self._mmap)
            except Exception as e:
                raise AttributionError(f"{f} is unreadable ({e}); run `grass-index verify "
                                       f"{self.path} --repair` to rebuild it") from e
            if self._vindex.ntotal != self.n_train:
                raise AttributionError(f"{f} holds {self._vindex.ntotal} vectors, config says "
                                       f"{self.n_train}; run `grass-index verify {self.path} "
                                       "--repair`")
        return self._vindex

    @property
    def preconditioner(self):
        if self._pre is None:
            key = self.config["preconditioner_key"]
            with self._reading() as store:
                if not has_preconditioner(store, key):
                    raise AttributionError(f"the preconditioner is missing from {self.path}; run "
                                           f"`grass-index verify {self.path} --repair`")
                self._pre = load_preconditioner(store, key, self.layout)
        return self._pre

    def close(self) -> None:
        self._vindex = self._pre = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- query side ----------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module):
        """The model must have the layers (names and shapes) the index was built on."""
        return _check_model(self.path, self.config, model)

    def _sketcher(self, model, device=None):
        return _query_sketcher(self.path, self.config, model, device)

    def query_sketches(self, model, examples: Sequence, loss_fn, *, collate=None,
                       batch_size: int | None = None, device=None) -> torch.Tensor:
        """Raw sketches g(z) [n, K] of the query examples (not preconditioned)."""
        return _sketch_queries(self.path, self.config, model, examples, loss_fn,
                               collate=collate, batch_size=batch_size, device=device)

    def query(self, model, examples: Sequence, loss_fn, k: int = 10, opponents: bool = False,
              *, collate=None, batch_size=None, device=None,
              nprobe: int | None = None) -> list[list[tuple[int, float]]]:
        """Per example, the k training examples with the largest (or, with opponents=True,
        the most negative) influence score, as (train_id, score) pairs, best first.
        ``nprobe`` (IVF only) overrides the index's number of lists searched."""
        if not isinstance(k, int) or k < 1:
            raise AttributionError(f"k must be a positive integer, got {k!r}")
        q = self.query_sketches(model, examples, loss_fn, collate=collate,
                                batch_size=batch_size, device=device)
        return self.search(q, k, opponents=opponents, nprobe=nprobe)

    def search(self, q: torch.Tensor, k: int = 10, opponents: bool = False,
               nprobe: int | None = None):
        """Top-k search with ready-made raw query sketches [n, K]."""
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int)
                                   or nprobe < 1):
            raise AttributionError(f"nprobe must be a positive integer, got {nprobe!r}")
        if q.shape[0] == 0:
            return []
        k = min(k, self.n_train)
        q = np.ascontiguousarray(q.numpy(), dtype=np.float32)
        if isinstance(self.vindex, SketchedIndex):  # two-stage: exact re-rank from the store
            pre = self.preconditioner
            with self._reading() as store:
                scores, ids = self.vindex.with_rerank(store_rerank(store, pre)).search(
                    q, k, opponents=opponents, nprobe=nprobe)
        else:
            scores, ids = self.vindex.search(q, k, opponents=opponents, nprobe=nprobe)
        scores, ids = np.asarray(scores), np.asarray(ids)
        return [[(int(i), float(s)) for i, s in zip(ids[r], scores[r]) if i >= 0]
                for r in range(len(ids))]

    def train_vectors(self):
        """Yield (start_id, preconditioned rows) from the stored sketches, in id order."""
        pre = self.preconditioner
        with self._reading() as store:
            yield from _preconditioned_blocks(store, pre)

    def score(self, model, examples: Sequence, loss_fn, *, collate=None, batch_size=None,
              device=None) -> torch.Tensor:
        """Exact scores [n_examples, n_train]: g(z)^T (F + lambda I)^-1 g(z_i)."""
        q = self.query_sketches(model, examples, loss_fn, collate=collate,
                                batch_size=batch_size, device=device)
        return self.score_sketches(q)

    def score_sketches(self, q: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape[0], self.n_train, dtype=torch.float32)
        for start, vec in self.train_vectors():
            out[:, start:start + len(vec)] = q @ torch.from_numpy(vec).T
        return out

    # -- maintenance --------------------------------------------------------------------
    def reprecondition(self, damping=None, hessian: str | None = None, index: str | None = None,
                       progress=False) -> "AttributionIndex":
        """Refit the preconditioner (and FAISS) from the stored sketches; no gradients."""
        hessian = _norm_hessian(hessian or self.config["hessian"])
        index = index or self.config.get("index_kind", "flat")
        _check_index(index)
        _check_damping(damping)
        self.close()
        self.config = _refit(self.path, self.config, hessian=hessian, damping=damping,
                             index=index, progress=progress)
        return self
