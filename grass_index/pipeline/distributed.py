"""Builds under torch.distributed (``torchrun``): rank r of W is worker r/W, rank 0 merges.

    torchrun --nproc_per_node=N -m grass_index.cli.main build TASK --out DIR

Each rank sketches its shard and sums its rows' ĝĝᵀ (``sharding._sketch_shard``); the Fisher
sums are all-reduced; then ``sharding._merge_ranks`` runs pass 2 on every rank at once: each
fits the same preconditioner and indexes its own shard into its own FAISS part, and rank 0
copies the sketches into the main store, joins the parts and writes the config. The index
answers like the single-process one (sketches bit for bit, scores to float64 rounding); every
rank returns the same config.

What is exchanged is small (each step's success or error; one float64 vector of Σ k_l² Fisher
sums; the empty index template; the recall queries and top lists), so when we create the process group we use gloo on every device: it needs no CUDA
device binding, and with nccl a rank that runs only CPU code would have nothing to bind to. A
group the caller already initialised is used as is (with nccl the sums travel on this rank's
GPU). An error on any rank is raised on every rank, with
the rank that failed, instead of leaving the others waiting.
"""
from __future__ import annotations

import datetime as _dt
import os

import numpy as np
import torch

from .errors import AttributionError

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
                                   "torchrun, or use `build --worker I/N` + `grass-index merge`")
        self.dist = dist
        self.owned = not dist.is_initialized()
        if self.owned:
            if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
                raise AttributionError("a distributed build needs torchrun's environment (RANK, "
                                       "WORLD_SIZE, MASTER_ADDR, MASTER_PORT); launch it with "
                                       "torchrun, or use `build --worker I/N`")
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

    def all_reduce_fisher(self, acc):
        """Every rank's FisherAccumulator summed (float64), on every rank."""
        from ..precondition import FisherAccumulator

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
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()
