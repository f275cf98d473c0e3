"""Builds under torch.distributed (``torchrun``): rank r of W is worker r/W of pass 1 and
builds part r of the FAISS index in pass 2; rank 0 joins the parts and commits.

    torchrun --nproc_per_node=N -m grass_index build TASK --out DIR

Each rank sketches its shard and sums its rows' ĝĝᵀ (``sharding.sketch_shard``); the Fisher
sums are all-reduced; then ``merge_ranks`` (below) runs the one pass 2 (``pass2.run_pass2``)
on every rank at once: each
fits the same preconditioner and indexes its own shard into its own FAISS part, and rank 0
copies the sketches into the main store, joins the parts and writes the config. The index
answers like the single-process one (sketches bit for bit, scores to float64 rounding); every
rank returns the same config.

What is exchanged is small (each step's success or error; one float64 vector of Σ k_l² Fisher
sums; the empty index template; the recall queries and top lists), so when we create the
process group we use gloo on every device: it needs no CUDA device binding, and with nccl a
rank that runs only CPU code would have nothing to bind to. A group the caller already
initialised is used as is (with nccl the sums travel on this rank's GPU). An error on any rank
is raised on every rank, with the rank that failed, instead of leaving the others waiting.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ...errors import spelled
from ...precondition import FisherAccumulator, save_preconditioner
from ...store import SketchStore
from ...indexdir.errors import AttributionError
from ...indexdir.files import SHARDS_DIR, STORE_DIR, jsonable
from ..factors import merge_shard_factors
from ..pass2 import Pass2Run, fit_from_sums, run_pass2
from .sharding import cache_fisher, copy_shards, merge_setup

# Rank 0's merge + pass 2 can take long while the others wait in a collective.
_TIMEOUT = _dt.timedelta(hours=24)


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def wanted(distributed) -> bool:
    """distributed=None: yes when a process group is up or torchrun's env says WORLD_SIZE > 1."""
    if distributed is not None:
        return bool(distributed)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return _env_world() > 1 and "RANK" in os.environ


class Group:
    """The process group of a distributed build (created here unless already initialised)."""

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_available():
            raise AttributionError("this torch build has no torch.distributed; run without "
                                   "torchrun, or use "
                                   + spelled("`build --worker I/N` + `grass-index merge`",
                                             "build_shard(..., worker='I/N') + "
                                             "merge_shards()"))
        self.dist = dist
        self.owned = not dist.is_initialized()
        if self.owned:
            if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
                raise AttributionError("a distributed build needs torchrun's environment (RANK, "
                                       "WORLD_SIZE, MASTER_ADDR, MASTER_PORT); launch it with "
                                       "torchrun, or use "
                                       + spelled("`build --worker I/N`",
                                                 "build_shard(..., worker='I/N')"))
            _bind_world_defaults()
            dist.init_process_group("gloo", timeout=_TIMEOUT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def device(self, device):
        """``cuda`` (no index) means this node's GPU number LOCAL_RANK."""
        if device is not None and str(device) == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return f"cuda:{local}"
        return device

    def step(self, fn):
        """Run fn on every rank; every rank gets the list of results, or the first error."""
        err = None
        try:
            res = (True, fn())
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            err, res = e, (False, str(e) if isinstance(e, AttributionError)
                           else f"{type(e).__name__}: {e}")
        got = [None] * self.world
        self.dist.all_gather_object(got, res)
        if err is not None:
            raise err
        for r, (ok, value) in enumerate(got):
            if not ok:
                raise AttributionError(f"rank {r} of {self.world} failed: {value}")
        return [v for _, v in got]

    def share(self, fn, encode, decode):
        """Rank 0's ``fn()`` on every rank, sent as ``encode``'s picklable form."""
        return decode(self.step(lambda: encode(fn()) if self.rank == 0 else None)[0])

    def all_reduce_fisher(self, acc):
        """Every rank's FisherAccumulator summed (float64), on every rank."""
        state = acc.state_dict()
        keys = sorted(state)
        flat = torch.cat([torch.from_numpy(np.asarray(state[k], np.float64)).reshape(-1)
                          for k in keys])
        device = "cuda" if self.dist.get_backend() == "nccl" else "cpu"
        flat = flat.to(device)
        self.dist.all_reduce(flat, op=self.dist.ReduceOp.SUM)
        flat, out, o = flat.cpu().numpy(), {}, 0
        for k in keys:
            shape = np.shape(state[k])
            size = int(np.prod(shape))
            out[k] = flat[o:o + size].reshape(shape)
            o += size
        total = FisherAccumulator(acc.layout)
        total.load_state_dict(out)
        return total

    def close(self):
        """Destroy the group we created: its C++ object goes with it, and with it gloo's
        worker threads (joined while the interpreter still runs; see ``_bind_world_defaults``
        for why that matters)."""
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _bind_world_defaults() -> None:
    """Import, before the group exists, the torch module whose functions take
    ``group=group.WORLD`` as a default argument (``torch.distributed.nn.functional``, which
    ``torch._dynamo`` imports, so the capture check and any ``torch.func`` call pull it in).
    Imported while our group is up, those defaults would hold the group for the rest of the
    process: ``destroy_process_group`` could not free it, gloo's worker threads would live
    into interpreter shutdown, and a worker dropping a finished collective's tensors there
    cannot take the GIL, so the rank dies with SIGABRT ("terminate called without an active
    exception") after the index was committed. Imported first, the defaults are None and
    ``close`` joins the threads (tests/test_distributed.py checks the threads are gone;
    docs/measurements.md has the exit counts)."""
    import torch.distributed.nn.functional  # noqa: F401  (for its import-time defaults)


def _global_ids(local_start: int, count: int, rank: int, world: int, B: int) -> np.ndarray:
    """Global training ids of local rows [local_start, +count) of shard rank-of-world."""
    local = np.arange(local_start, local_start + count, dtype=np.int64)
    return ((local // B) * world + rank) * B + local % B


class ShardRows:
    """What a torchrun rank indexes in pass 2: its own shard; local row j of shard rank-of-world
    is a fixed training id (``_global_ids``)."""

    def __init__(self, shard: Path, rank: int, world: int, batch_size: int):
        self.shard, self.rank, self.world, self.B = shard, rank, world, batch_size

    @contextlib.contextmanager
    def open(self):
        with SketchStore.open(self.shard, readonly=True) as st:
            yield st

    def global_ids(self, start: int, count: int) -> np.ndarray:
        return _global_ids(start, count, self.rank, self.world, self.B)

    def query_rows(self, qids: np.ndarray):
        return _held_rows(self.shard, qids, self.rank, self.world, self.B)


def merge_ranks(group, out: Path, *, fisher, progress, remove_shards: bool = False) -> dict:
    """torchrun's pass 2 — the same ``pass2.run_pass2`` as one process, spread over the ranks:
    every rank fits the same preconditioner from the all-reduced Fisher and preconditions its
    own shard into its own FAISS part; rank 0 copies the sketches into the main store, joins
    the parts — into one file, or kept as one part per rank when ``shards=`` was asked for —
    and commits config.json. Every rank returns the config."""
    out = Path(out)
    rank, world = group.rank, group.world
    # rank 0 checks every shard once; step hands its findings (or its error) to every rank
    build, n, shards, rec, index_options = group.step(
        lambda: merge_setup(out, world, {}) if rank == 0 else None)[0]
    rows = ShardRows(shards[rank], rank, world, build["batch_size"])

    @contextlib.contextmanager
    def main_store(pre, key):
        """Rank 0: the main store, made from the shards (resumable), with the summed Fisher
        and the preconditioner, as a single process's build would hold them."""
        with SketchStore.create(out / STORE_DIR, dim=build["dim"], meta=jsonable(build)) as store:
            copy_shards(store, build, world, shards, progress)
            merge_shard_factors(store, shards, world)  # so EK-FAC can be fitted later
            if index_options.hessian == "eFIM":
                cache_fisher(store, build, world, shards, fisher)
            save_preconditioner(store, key, pre)
            yield store
        if remove_shards:
            shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)

    fit = lambda: fit_from_sums(fisher, build["layout"], index_options.hessian,  # noqa: E731
                                index_options.damping)
    return run_pass2(out, build, rec.get("describe") or {}, index_options, Pass2Run(
        rows=rows, ranks=group, fit=fit, main_store=main_store, task=rec.get("task"),
        item_signature=rec.get("item_signature"), progress=progress))


def _held_rows(shard: Path, qids: np.ndarray, rank: int, world: int, B: int):
    """(positions in qids, raw rows) of the query ids this shard holds."""
    batch = qids // B
    pos = np.flatnonzero(batch % world == rank)
    local = (batch[pos] // world) * B + qids[pos] % B
    with SketchStore.open(shard, readonly=True) as st:
        rows = st.get_rows(local) if len(pos) else np.zeros((0, st.dim), np.float32)
    return pos, np.asarray(rows, np.float32)
