"""A build's memory and disk, estimated before pass 1 from the model's layer sizes, the sketch
layout, n, the Hessian and the index spec — a pure function, so `grass-index plan` can show
several spec choices side by side and a build can refuse what will not fit before it starts.

Each layer is priced in the form pass 2 keeps it (costs.py, by the pipeline's own rule):
low-rank (n < k) an n×n core over the stored rows, dense (n ≥ k) a float32 k×k inverse fitted
from a float64 k×k Fisher sum (held from pass 1 into pass 2, cached on disk), EK-FAC its
Kronecker eigenbases. Then:
  * the sketch store: 4·n·K bytes; the FAISS index: n × index width × 4 (or 2 for fp16), the
    width K when the exact index fits half the RAM left for it (index/choice.py), else the
    narrowest search sketch;
  * per batch: every hooked layer's inputs and output gradients, B·T·Σ(d_in + d_out) floats.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

from ..capture import GradientSketcher, as_checkpoints, select_layers
from ..capture.ensemble import block_name, single_model
from ..index import parse_spec
from ..index.choice import BUDGET_SHARE, planned_width
from ..errors import option
from ..precondition import ekfac_unsupported
from . import costs

GB = 1e9
RECALL_QUERIES = costs.RECALL_QUERIES
ACT_FACTOR = 3.0  # activations + their gradients + autograd's own saved tensors, per hooked float
BASE_BYTES = 0.6 * GB  # the interpreter, torch, faiss and LMDB mappings before any data
STORE_OVERHEAD = 1.02  # LMDB pages and block headers around the 4·n·K bytes of rows
PAGE = 4096  # an LMDB page: each stored block takes whole pages
DIR_BYTES = 96 << 10  # an empty store (LMDB meta, roots, lock) + config.json, build.json
INDEX_HEADER = 4 << 10  # a FAISS file's header and metadata


def store_bytes(n: int, K: int, batch_size: int) -> float:
    """The sketch store on disk: each block of B rows (+ its header) in whole overflow pages,
    or packed into leaf pages when under half a page."""
    import math

    B = max(1, min(batch_size, max(n, 1)))
    full, rest = divmod(int(n), B)

    def pages(rows):
        size = 4.0 * rows * K + 64
        return size / PAGE if size < PAGE / 2 else math.ceil((size + 16) / PAGE)
    return (full * pages(B) + (pages(rest) if rest else 0)) * PAGE * STORE_OVERHEAD + DIR_BYTES


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes a build needs (peak RAM and each file), plus what each part is."""
    n: int
    K: int
    dense_layers: int
    ram_pass1: float
    ram_pass2: float
    store_disk: float
    fisher_disk: float
    precond_disk: float
    index_disk: float
    low_rank_layers: int = 0
    ekfac_layers: int = 0
    layers: tuple = ()  # costs.Layer per layer: what pass 2 does with it
    index_width: int = 0
    index_bytes: int = 4
    damping: str | None = None
    index_in_store: bool = False  # an exact index scanned from the store: no FAISS copy

    @property
    def ram_peak(self) -> float:
        return max(self.ram_pass1, self.ram_pass2)

    @property
    def disk(self) -> float:
        return self.store_disk + self.fisher_disk + self.precond_disk + self.index_disk

    def rows(self) -> list[tuple[str, str]]:
        g = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
        forms = f"{self.dense_layers} / {self.low_rank_layers} / {self.ekfac_layers}"
        width = "exact" if self.index_width in (0, self.K) else f"sketch {self.index_width:,}"
        if self.index_in_store:
            width = "exact, scanned from the store (no copy)"
        return [("sketch width K", f"{self.K:,}"), ("examples n", f"{self.n:,}"),
                ("layers dense / low-rank / EK-FAC", forms), ("FAISS index", width),
                ("RAM peak", g(self.ram_peak)), ("  pass 1", g(self.ram_pass1)),
                ("  pass 2", g(self.ram_pass2)), ("disk total", g(self.disk)),
                ("  sketch store", g(self.store_disk)), ("  Fisher cache", g(self.fisher_disk)),
                ("  preconditioner", g(self.precond_disk)), ("  FAISS index", g(self.index_disk))]


def estimate(*, layer_dims: list[dict], layout: dict[str, int], n: int, batch_size: int,
             tokens: int = 1, index_width: int | None = None, index_bytes: int = 4,
             hessian: str = "eFIM", model_bytes: int = 0, factors: dict | None = None,
             damping="auto", index: str = "flat") -> Plan:
    """The plan of one build. ``layer_dims``: [{d_in, d_out}] of the hooked layers;
    ``tokens``: positions per example (T for a sequence model, 1 otherwise); ``index_width``:
    floats per vector in FAISS (K for flat, the search sketch's width otherwise);
    ``factors``: {layer: (k_in, k_out)} of a factored, identity spec (pass 1 keeps their
    Kronecker factors; EK-FAC fits from them); ``damping``: the build's (``auto`` prices an
    eigvalsh per dense layer); ``index``: the spec (an exact float32 index in one part is
    the store's rows, indexdir/scan.py: no FAISS copy to hold or write)."""
    layers = costs.layer_forms(layout, n, hessian, factors)
    K = sum(x.k for x in layers)
    fisher = costs.fisher_sum_bytes(layers)  # float64 sums, pass 1 into pass 2
    B = min(batch_size, max(n, 1))
    # a flat layer (norm, embedding, lone bias) has no d_in/d_out: its exact per-example
    # gradients hold numel floats per example instead
    acts = ACT_FACTOR * 4.0 * B * tokens * sum(
        int(d["d_in"]) + int(d["d_out"]) if d.get("d_in") is not None else int(d.get("numel") or 0)
        for d in layer_dims)
    fisher_chunk = max(1, min(costs.GEMM_ROWS, costs.CHUNK_BYTES // (4 * max(K, 1))))
    base = BASE_BYTES + 2.0 * model_bytes  # weights + what loading them keeps around
    kron = costs.factor_bytes(factors)
    fisher1 = fisher if hessian == "eFIM" else 0.0  # EK-FAC sums its eFIM layers in pass 2
    pass1 = base + acts + 3.0 * 4 * B * K + fisher1 + kron \
        + (4.0 * fisher_chunk * K if fisher1 else 0.0)
    width = K if index_width is None else int(index_width)
    in_store = width == K and parse_spec(index).scans_store
    index_ram = 0.0 if in_store else float(n) * width * index_bytes
    stages = costs.pass2_ram(layers, n, K, index_ram)
    pass2 = base + max(stages.values())
    return Plan(n=n, K=K, dense_layers=costs.count(layers, "dense"), ram_pass1=pass1,
                ram_pass2=pass2, store_disk=store_bytes(n, K, batch_size) + kron,
                fisher_disk=fisher if hessian == "eFIM" else 0.0,
                precond_disk=costs.form_bytes(layers, n),
                index_disk=0.0 if in_store else index_ram + INDEX_HEADER,
                low_rank_layers=costs.count(layers, "low_rank"),
                ekfac_layers=costs.count(layers, "ekfac"), layers=layers, index_width=width,
                index_bytes=index_bytes, damping=None if damping is None else str(damping),
                index_in_store=in_store)


def available_ram() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), else None (then RAM is not checked)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_disk(path) -> float:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing parent)."""
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return float(shutil.disk_usage(p).free)


def _bytes_under(path) -> float:
    """Bytes already written under ``path`` (a resumed build needs only the rest)."""
    from pathlib import Path

    p = Path(path)
    return float(sum(f.stat().st_blocks * 512 for f in p.rglob("*") if f.is_file())) \
        if p.is_dir() else 0.0


def shortfall(plan: Plan, *, ram: float | None, disk: float | None, K_per_layer: int,
              index: str = "flat") -> str | None:
    """None when the plan fits, else one line: what does not fit and what to change."""
    if ram is not None and plan.ram_peak > ram:
        fix = (f"{option('projection', f'sjlt-{max(K_per_layer // 2, 1)}')} (the Fisher "
               "and inverses shrink 4x)" if plan.fisher_disk + plan.precond_disk >
               plan.ram_peak / 2 else
               f"fewer {option('layers')} or a smaller {option('batch_size')}")
        return (f"this build needs about {plan.ram_peak / GB:.1f} GB of RAM but "
                f"{ram / GB:.1f} GB is available; use {fix}")
    if disk is not None and plan.disk > disk:
        if plan.index_disk > plan.disk / 3 and "fp16" not in index:
            fix = f"{option('index', 'flat:fp16')} (half the index)"
        else:
            fix = (f"{option('projection', f'sjlt-{max(K_per_layer // 2, 1)}')} or fewer "
                   f"{option('layers')}")
        return (f"this build needs about {plan.disk / GB:.1f} GB of disk at {option('out')} but "
                f"{disk / GB:.1f} GB is free; use {fix}")
    return None


# --- time: grass_index/plan/timing.py ---------------------------------------------------------

from .timing import (PASS1_EFFICIENCY, Rates, disk_rate, epoch_flops, lapack_order,  # noqa: E402,F401
                     matmul_params, measure_rates, on_meta_device, pass1_flops, pass2_seconds,
                     pass2_stages, predict_seconds)


def shortfall_here(plan: Plan, out, *, K_per_layer: int, index: str = "flat") -> str | None:
    """``shortfall`` against the RAM available now and the free disk at ``out`` (what a resumed
    build already wrote there counts as free): a build refuses, before pass 1, what this says
    will not fit — one line with the fix — instead of meeting the OOM killer hours later."""
    return shortfall(plan, ram=available_ram(), disk=free_disk(out) + _bytes_under(out),
                     K_per_layer=K_per_layer, index=index)


def summary(plan: Plan) -> str:
    """The plan as the one line a build prints before pass 1."""
    return (f"plan: RAM peak {plan.ram_peak / GB:.2f} GB, disk {plan.disk / GB:.2f} GB (store "
            f"{plan.store_disk / GB:.2f}, Fisher {plan.fisher_disk / GB:.2f}, preconditioner "
            f"{plan.precond_disk / GB:.2f}, index {plan.index_disk / GB:.2f})")


# --- `grass-index plan`: the same table for several spec choices ------------------------------

def index_width(K: int, index: str = "flat", n: int = 1, held: float = 0.0) -> int:
    """Floats per vector FAISS holds for an index spec over n examples: K when the exact index
    fits its memory budget (index/choice.py: half the RAM available when pass 2 chooses —
    here, what is available now less ``held``, the bytes the build will hold by then), else the
    narrowest search sketch a build tries."""
    spec = parse_spec(index)
    if spec.budget < 0 and held > 0:
        avail = available_ram()
        if avail is not None:
            spec = spec._replace(budget=int(BUDGET_SHARE * max(avail - held, 0.0) / 1e6))
    return planned_width(spec, K, n) or K


def factor_shapes(sketcher) -> dict[str, tuple[int, int]] | None:
    """{layer: (k_in, k_out)} whose gradient a factored spec with identity projection sketches
    as the Kronecker-factored k_out×k_in matrix (pipeline/factors.py keeps their factors in
    pass 1), assuming the hooked route the first-batch check confirms; None for other specs."""
    if ekfac_unsupported(sketcher.sparsification, sketcher.projection) is not None:
        return None
    out = {}
    for layer in sketcher.layers:
        comp = sketcher.compressors[layer.name]
        if layer.kind != "flat" and layer.groups == 1 and hasattr(comp, "compress_in"):
            out[layer.name] = (int(comp.compress_in.k), int(comp.compress_out.k))
    return out or None


def layout_for(model, *, sparsification: str = "random_mask-128*128",
               projection: str = "sjlt-4096", layers=None, seed: int = 0) -> dict[str, int]:
    """{layer: sketch width} of one model (checkpoint 0 of an ensemble) under these specs."""
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    m = (as_checkpoints(model) or [single_model(model)])[0]
    return GradientSketcher(m, select_layers(m, layers), sparsification=sparsification,
                            projection=projection, seed=seed, clamp=True).layout


def timed_batch_seconds(model, data, loss_fn, collate, options, projection: str) -> float:
    """Seconds of one batch of pass 1 (the first batch, sketched after the capture check and
    one warm-up batch): the time prediction's basis when the model and data are at hand."""
    import time

    from ..calls import collate_items

    infos = select_layers(model, options.layers)
    sk = GradientSketcher(model, infos, sparsification=options.sparsification,
                          projection=projection, seed=options.seed, clamp=True)
    b = min(options.batch_size, len(data))
    batch = collate_items(collate, [data[i] for i in range(b)], f"examples 0..{b - 1}")
    sk.sketch(batch, loss_fn)  # the capture check + a warm-up
    t0 = time.perf_counter()
    sk.sketch(batch, loss_fn)
    return time.perf_counter() - t0


def duration(seconds: float) -> str:
    """'42 s', '3.5 min', '7.2 h', '3.1 days'."""
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def plan_for(model, n: int, *, sparsification: str = "random_mask-128*128",
             projection: str = "sjlt-4096", layers=None, batch_size: int = 32,
             index: str = "flat", hessian: str = "eFIM", tokens: int = 1, seed: int = 0,
             damping="auto") -> Plan:
    """The plan of building ``model`` over n examples with these specs (no gradient is taken;
    the model may be on the meta device).

    ``model`` may be a list of C checkpoints (an ensemble): the sketch width, Fisher blocks,
    inverses, store and index scale with C, and all C models are held; the activations do not
    (checkpoints are sketched one after another)."""
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    models = as_checkpoints(model) or [single_model(model)]
    infos = select_layers(models[0], layers)
    sk = GradientSketcher(models[0], infos, sparsification=sparsification,
                          projection=projection, seed=seed, clamp=True)
    layout = sk.layout if len(models) == 1 else {
        block_name(c, name): k for c in range(len(models)) for name, k in sk.layout.items()}
    factors = factor_shapes(sk) if len(models) == 1 else None
    dims = [dict(d_in=i.d_in, d_out=i.d_out) for i in infos]
    model_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    kw = dict(layer_dims=dims, layout=layout, n=n, batch_size=batch_size, tokens=tokens,
              index_bytes=2 if "fp16" in str(index) else 4, hessian=hessian,
              model_bytes=model_bytes, factors=factors, damping=damping, index=str(index))
    # the index is chosen in pass 2, when the preconditioner and the model are held
    K = sum(layout.values())
    return estimate(**kw, index_width=index_width(K, index, n, held=held_in_pass2(
        costs.layer_forms(layout, n, hessian, factors), n, K, model_bytes)))


def held_in_pass2(layers, n: int, K: int, model_bytes: float) -> float:
    """Bytes a build holds when pass 2 chooses its index: the process, the model and the
    fitted preconditioner (with the [n, K] rows its low-rank layers apply through)."""
    rows = 4.0 * n * K if any(x.form == "low_rank" for x in layers) else 0.0
    return BASE_BYTES + 2.0 * model_bytes + costs.form_bytes(layers, n) + rows


def variants(projection: str) -> list[str]:
    """The given projection and two narrower ones (same type), for a side-by-side plan."""
    kind, _, dim = projection.rpartition("-")
    if not dim.isdigit() or "*" in dim:
        return [projection]
    d = int(dim)
    return [projection] + [f"{kind}-{d // f}" for f in (2, 4) if d // f >= 1]
