"""A build end to end, in its three shapes, behind four functions:

    build          one process: pass 1 into sketches/, then pass 2 (``pass2.finish``); or, under
                   torchrun (more than one rank), every rank sketches its shard, the Fisher sums
                   are all-reduced and pass 2 runs spread over the ranks (``distributed``)
    build_shard    `build --worker I/N`: pass 1 over worker I's batches into shards/I-of-N
    merge_shards   once all N shards exist: copy them into sketches/, then the same pass 2
    refit_index    pass 2 again over a finished index's stored sketches (no gradients)
    check_capture  `build --check`: the first-batch capture check alone, as a report

Everything that can be checked without writing is checked before the output directory is
claimed (build.json). Options travel as ``BuildOptions`` / ``IndexOptions``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import arguments, plan as build_plan
from ..capture import EnsembleSketcher, GradientSketcher, as_checkpoints, select_layers
from ..capture.ensemble import different_architecture, single_model
from ..capture.sketcher import CHECK_EXAMPLES
from ..compress import load_selective_mask
from ..store import SketchStore
from ..calls import check_loss, collate_items, default_collate
from .parallel import distributed as dist_build
from ..indexdir.errors import AttributionError
from ..indexdir.files import MASK_FILE, STORE_DIR, atomic_write, jsonable
from ..indexdir.fingerprints import data_signature, layer_dims
from ..devices import check_device
from ..errors import option
from .options import (BuildOptions, IndexOptions, check_damping, check_index,
                      check_train_data, damping_key, norm_hessian)
from .factors import check_ekfac, factor_shapes
from .pass2 import finish, pass1_fisher, refit
from .progress import Progress
from ..indexdir import record
from ..indexdir.record import claim_out_dir_locked, hashed_like_recorded, make_build_record
from .parallel.sharding import merge, parse_worker, read_shard_fisher, sketch_shard
from .sketching import sketch_training_set

log = logging.getLogger("grass_index")


@dataclass(frozen=True)
class BuildResult:
    """A finished index: its directory and config; ``reporting`` is False on the torchrun
    ranks other than 0 (every rank returns the index; one of them should report it)."""

    path: Path
    config: dict
    reporting: bool = True


@dataclass(frozen=True)
class ShardInfo:
    """What one worker's shard holds (`build --worker I/N`); the index needs `merge_shards`."""

    shard: str
    path: str
    batches: int
    rows: int
    n_batches: int

    def to_dict(self) -> dict:
        return asdict(self)


def _capture_setup(model, train_data, loss_fn, options: BuildOptions, *, collate, device):
    """What pass 1 and the capture check share: the inputs checked, the layers, the sketcher
    (not yet checked) and the examples its check runs on (the first of the first batch).
    An ensemble (a list of checkpoints) gets one sketcher per checkpoint behind an
    EnsembleSketcher, every checkpoint checked to have checkpoint 0's layers."""
    check_train_data(train_data)
    check_device(device)
    collate = collate or default_collate
    masks = (load_selective_mask(options.selective_mask)
             if options.selective_mask is not None else None)
    models = as_checkpoints(model)  # an ensemble: every checkpoint, sketched per batch
    sketchers, infos = [], None
    for c, m in enumerate(models or [single_model(model)]):
        m.eval()
        where = "loss_fn" if models is None else f"loss_fn on checkpoint {c}"
        # Everything that can be checked without writing is checked first.
        check_loss(m, train_data, loss_fn, collate, where=where)
        infos_c = select_layers(m, options.layers)
        if infos is not None:
            differs = different_architecture(c, layer_dims(infos_c), layer_dims(infos))
            if differs:
                raise AttributionError(differs)
        infos = infos or infos_c
        sketchers.append(GradientSketcher(m, infos_c, sparsification=options.sparsification,
                                          projection=options.projection, seed=options.seed,
                                          clamp=True, device=device, selective_masks=masks))
    sketcher = sketchers[0] if models is None else EnsembleSketcher(sketchers)
    n = min(options.batch_size, CHECK_EXAMPLES, len(train_data))
    first = collate_items(collate, [train_data[i] for i in range(n)],
                          f"training examples 0..{n - 1}")
    return collate, infos, masks, sketcher, first


@dataclass(frozen=True)
class CaptureCheck:
    """`build --check`: how each selected layer is captured, checked on the first examples
    without building anything. ``ok`` when every layer is captured exactly (hooks, or
    torch.func where the check moved it); ``failed`` holds the layers no route captures
    exactly, each with the --layers glob that excludes it."""

    layers: list
    left_out: dict
    examples: int

    @property
    def failed(self) -> list:
        return [r for r in self.layers if r["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return dict(ok=self.ok, examples=self.examples, layers=list(self.layers),
                    failed=[dict(layer=r["layer"], exclude=r["exclude"], note=r["note"])
                            for r in self.failed], left_out=dict(self.left_out))


def check_capture(model, train_data, loss_fn, options: BuildOptions | None = None, *,
                  collate=None, device=None) -> CaptureCheck:
    """Run the build's first-batch capture check for ``options``' layers and specs, and
    nothing else (no directory is written); a layer that fails is reported, not raised."""
    options = options or BuildOptions()
    _, _, _, sketcher, first = _capture_setup(model, train_data, loss_fn, options,
                                              collate=collate, device=device)
    sketcher.check(first, loss_fn, strict=False)
    return CaptureCheck(layers=jsonable(sketcher.check_report()),
                        left_out=dict(sketcher.left_out),
                        examples=int(min(options.batch_size, CHECK_EXAMPLES, len(train_data))))


class _Prepared:
    """Pass 1's inputs, checked: the layers, the sketcher, the build record, the layer notes."""

    def __init__(self, model, train_data, loss_fn, options: BuildOptions, *, collate, device):
        self.collate, infos, self.masks, self.sketcher, first = _capture_setup(
            model, train_data, loss_fn, options, collate=collate, device=device)
        # verify every layer's capture on the first examples (routes + notes land in
        # describe); a layer no route captures exactly is one error line, before pass 1
        self.sketcher.check(first, loss_fn)
        self.describe = jsonable(self.sketcher.describe())
        for name, d in self.describe.items():
            note = "; ".join(map(str, d.get("clamped") or []))
            if note:
                log.info("layer %s: %s", name, note)
        self.build = make_build_record(options, model=model, infos=infos, sketcher=self.sketcher,
                                       train_data=train_data, masks=self.masks)
        self.model = model  # to hash it again as an older build.json did (resuming that build)
        self.mask_file = options.selective_mask
        self.train_data, self.loss_fn, self.batch_size = train_data, loss_fn, options.batch_size
        self.workers = options.workers

    def plan(self, index_options: IndexOptions) -> build_plan.Plan:
        """RAM and disk this build needs (grass_index/plan/), from the layer sizes and specs."""
        index, n, layout = str(index_options.index), len(self.train_data), self.sketcher.layout
        factors = factor_shapes(self.sketcher)
        forms = build_plan.costs.layer_forms(layout, n, index_options.hessian, factors)
        # the model is loaded already: what pass 2 will hold besides is its preconditioner
        held = build_plan.held_in_pass2(forms, n, self.sketcher.dim, 0) - build_plan.BASE_BYTES
        return build_plan.estimate(
            layer_dims=self.build["layer_dims"], layout=layout, n=n,
            batch_size=self.batch_size, hessian=index_options.hessian,
            index_width=build_plan.index_width(self.sketcher.dim, index, n, held=held),
            index_bytes=2 if "fp16" in index else 4, factors=factors,
            damping=index_options.damping, index=index)

    def check_fits(self, out: Path, index_options: IndexOptions) -> build_plan.Plan:
        """The plan, or one error line with the fix when it does not fit this machine now."""
        the_plan = self.plan(index_options)
        short = build_plan.shortfall_here(the_plan, out,
                                          K_per_layer=max(self.sketcher.layout.values()),
                                          index=str(index_options.index))
        if short:
            raise AttributionError(short)
        return the_plan

    def claim(self, out: Path) -> None:
        """Workers/ranks of one build claim in turn (milliseconds each, under the lock)."""
        self.build = hashed_like_recorded(out, self.build, self.model)
        claim_out_dir_locked(out, self.build, wait_s=record.CLAIM_WAIT_S).release()
        self._copy_mask(out)

    def claim_locked(self, out: Path):
        """A single process claims ``out`` (build.json) under the store's writer lock and keeps
        the lock for ``SketchStore.create``: two builds into one new directory cannot both
        claim it."""
        self.build = hashed_like_recorded(out, self.build, self.model)
        lock = claim_out_dir_locked(out, self.build)
        try:
            self._copy_mask(out)
        except BaseException:
            lock.release()
            raise
        return lock

    def _copy_mask(self, out: Path) -> None:
        if self.masks is not None:
            atomic_write(out / MASK_FILE, Path(self.mask_file).read_bytes())

    def shard(self, out: Path, worker, index_options: IndexOptions, task, progress) -> ShardInfo:
        self.claim(out)
        records = dict(describe=self.describe, task=task,
                       item_signature=data_signature(self.train_data),
                       finish=index_options.record())
        return ShardInfo(**sketch_shard(
            out, worker, self.sketcher, self.build, train_data=self.train_data,
            loss_fn=self.loss_fn, batch_size=self.batch_size, collate=self.collate,
            workers=self.workers,
            progress=progress, records=records))


# pass 1's checked inputs, for what extends a finished index (grass_index/living/)
Prepared = _Prepared


def recorded_task(task) -> dict | None:
    """The task's record {task, task_sha256} that config.json keeps; the façade makes it from
    a task reference or a loaded task (grass_index.task.task_record)."""
    if task is None:
        return None
    if not isinstance(task, dict):
        raise AttributionError(f"the build takes the task's record (grass_index.task."
                               f"task_record(task)), not a {type(task).__name__}")
    return dict(task=task.get("task"), task_sha256=task.get("task_sha256"))


def build(model, train_data, loss_fn, out, options: BuildOptions | None = None,
          index_options: IndexOptions | None = None, *, task=None, collate=None, progress=True,
          device=None, distributed: bool | None = None, remove_shards: bool = False) -> BuildResult:
    """Sketch every training example (pass 1, resumable), precondition and index (pass 2).

    ``distributed`` (default: when torchrun's environment or an initialised process group has
    more than one rank) makes every rank sketch its shard; see ``distributed``."""
    out = arguments.directory(out, "build_index", "out")
    options = arguments.options(options, BuildOptions, "build", "options")
    index_options = arguments.options(index_options, IndexOptions, "build", "index_options")
    check_train_data(train_data)
    task = recorded_task(task)
    group = None
    if dist_build.wanted(distributed):
        group = dist_build.Group()
        if group.world == 1:
            group.close()
            group = None
        else:
            device = group.device(device)
    try:
        prep = _Prepared(model, train_data, loss_fn, options, collate=collate, device=device)
        check_ekfac(index_options.hessian, prep.sketcher)
        prog = Progress(progress)
        try:
            if group is not None:
                return _build_ranks(group, prep, out, index_options, task, prog, remove_shards)
            # the plan: refuse before pass 1 what will not fit (RAM now, disk at out)
            the_plan = prep.check_fits(out, index_options)
            lock = prep.claim_locked(out)
            prog.note(build_plan.summary(the_plan))
            prog.eta_after_first("sketch", build_plan.pass2_seconds(
                prep.sketcher.layout, the_plan.n, index_options.hessian,
                build_plan.measure_rates(seconds=0.1, lapack_size=512), the_plan),
                "pass 2")  # (LAPACK measured small: this ETA must not delay the build)
            try:
                store = SketchStore.create(out / STORE_DIR, dim=prep.sketcher.dim,
                                           meta=jsonable(prep.build), lock=lock)
            except BaseException:
                lock.release()
                raise
            with store:
                # pass 1 accumulates the Fisher sums pass 2 needs (no re-read of the store)
                fisher = pass1_fisher(store, prep.sketcher.layout, index_options.hessian,
                                      len(train_data))
                sketch_training_set(store, prep.sketcher, train_data, loss_fn,
                                    batch_size=options.batch_size, collate=prep.collate,
                                    progress=prog, fisher=fisher,
                                    factors=factor_shapes(prep.sketcher),
                                    workers=options.workers)
                cfg = finish(out, store, prep.build, prep.describe, index_options, task=task,
                             progress=prog, data=train_data, fisher=fisher)
            return BuildResult(out, cfg)
        finally:
            prog.close()
    finally:
        if group is not None:
            group.close()


def _build_ranks(group, prep: _Prepared, out: Path, index_options: IndexOptions, task, prog,
                 remove_shards: bool) -> BuildResult:
    """torchrun: every rank is worker rank/world of pass 1, then pass 2 spread over the ranks."""
    if index_options.hessian == "ekfac":
        raise AttributionError(f"{option('hessian', 'ekfac')} is not fitted under torchrun (its "
                               "eigenvalue correction reads every sketch); build with "
                               f"{option('hessian', 'eFIM')}, then re-precondition the index "
                               "with hessian ekfac in one process")
    # rank 0 claims the directory first, so the others only compare with its build.json
    group.step(lambda: prep.claim(out) if group.rank == 0 else None)
    group.step(lambda: prep.shard(out, (group.rank, group.world), index_options, task, prog))
    fisher = None
    if index_options.hessian == "eFIM":  # each rank's sums, read inside a step so errors reach all
        held = {}

        def read_mine():
            held["acc"] = read_shard_fisher(out, (group.rank, group.world), prep.sketcher.layout)
        group.step(read_mine)
        fisher = group.all_reduce_fisher(held["acc"])
    cfg = dist_build.merge_ranks(group, out, fisher=fisher, progress=prog,
                                 remove_shards=remove_shards)
    return BuildResult(out, cfg, reporting=group.rank == 0)


def build_shard(model, train_data, loss_fn, out, worker, options: BuildOptions | None = None,
                index_options: IndexOptions | None = None, *, task=None, collate=None,
                progress=True, device=None) -> ShardInfo:
    """`build --worker I/N`: sketch only worker I's batches (b % N == I) into
    ``out/shards/I-of-N/`` (resumable), recording ``index_options`` for the merge. Once all N
    shards exist, ``merge_shards`` finishes the index; its sketches equal a single-process
    build's bit for bit."""
    out = arguments.directory(out, "build_shard", "out")
    worker = parse_worker(worker)
    if worker is None:
        raise AttributionError("build_shard needs worker=(i, n) or 'i/n'")
    options = arguments.options(options, BuildOptions, "build_shard", "options")
    index_options = arguments.options(index_options, IndexOptions, "build_shard",
                                      "index_options")
    task = recorded_task(task)
    prep = _Prepared(model, train_data, loss_fn, options, collate=collate, device=device)
    check_ekfac(index_options.hessian, prep.sketcher)
    prog = Progress(progress)
    try:
        return prep.shard(out, worker, index_options, task, prog)
    finally:
        prog.close()


def merge_shards(out, *, shards: int | None = None, hessian: str | None = None, damping=None,
                 index: str | None = None, progress=True,
                 remove_shards: bool = False) -> BuildResult:
    """Finish a `build --worker I/N` build: check every shard (clear errors for missing,
    incomplete, duplicate and mismatched ones), copy them into the main store in batch order,
    run pass 2. ``hessian``/``damping``/``index`` default to what the workers were given."""
    if hessian is not None:
        hessian = norm_hessian(hessian)
    if index is not None:
        check_index(index)
    if damping is not None:
        check_damping(damping)
    out = arguments.directory(out, "merge_shards", "out")
    prog = Progress(progress)
    try:
        cfg = merge(out, n=shards, overrides=dict(hessian=hessian, damping=damping_key(damping),
                                                  index=index),
                    progress=prog, remove_shards=remove_shards)
    finally:
        prog.close()
    return BuildResult(out, cfg)


def refit_index(path, config: dict, index_options: IndexOptions, progress=False, *,
                tune: dict | None = None) -> dict:
    """Pass 2 again over a finished index's stored sketches (another damping, Hessian or index
    kind); the new config. ``tune``: the record of the `tune` sweep that chose
    ``index_options``, written into the new config (grass_index.eval.tune)."""
    return refit(Path(path), config, index_options, progress=progress, tune=tune)
