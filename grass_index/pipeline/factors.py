"""The Kronecker factors EK-FAC needs, accumulated during pass 1 (they cannot be recomputed from
the stored sketches): which layers get them, the observer hooks, resuming and merging them,
and the EK-FAC fit of pass 2 (corrected eigenvalues from one read of the stored sketches).

Every build whose spec is factored with an identity projection (LoGra-style ``A*B``) keeps
them, whatever its Hessian, so ``reprecondition``/``tune`` can switch to EK-FAC later without
recomputing a gradient; the cost is measured in benchmarks/ekfac.py.
"""
from __future__ import annotations

import contextlib
import functools
import time

import numpy as np

from ..capture import EnsembleSketcher
from ..precondition import (ChunkedFisher, KroneckerFactors, Preconditioner,
                            corrected_eigenvalues, dense_layers, ekfac_unsupported,
                            load_factors, save_factors)
from ..precondition.fisher import layer_slices
from ..store import SketchStore
from ..errors import option
from ..indexdir.errors import AttributionError

# Pass 1 checkpoints the factor sums at most this often (and after its last block): a write
# costs about as much as committing a block, so per-block checkpoints would double the store
# traffic of a small model; a resume recomputes the factors of at most this much work.
SAVE_EVERY_S = 10.0


def factor_shapes(sketcher) -> dict[str, tuple[int, int]] | None:
    """{layer: (k_in, k_out)} of the layers whose sketch is a Kronecker-factored gradient
    (factored spec, identity projection, hooked capture, one group), or None when the spec is
    not factored-with-identity, or for a checkpoint ensemble (its blocks are per checkpoint;
    factors are not kept for them)."""
    if isinstance(sketcher, EnsembleSketcher):
        return None
    if ekfac_unsupported(sketcher.sparsification, sketcher.projection) is not None:
        return None
    out = {}
    for layer in sketcher.layers:
        comp = sketcher.compressors[layer.name]
        if layer.kind == "flat" or layer.groups != 1 or not hasattr(comp, "compress_in") \
                or sketcher.route[layer.name] == "exact":
            continue
        out[layer.name] = (int(comp.compress_in.k), int(comp.compress_out.k))
    return out or None


def check_ekfac(hessian: str, sketcher) -> None:
    """Before pass 1: --hessian ekfac on a spec or model without Kronecker-factored layers is
    one error line with the fix."""
    if hessian != "ekfac":
        return
    why = ekfac_unsupported(sketcher.sparsification, sketcher.projection)
    if why is None and isinstance(sketcher, EnsembleSketcher):
        why = (f"{option('hessian', 'ekfac')} is not available for a checkpoint ensemble (its "
               f"Kronecker factors would be per checkpoint); use {option('hessian', 'eFIM')}")
    if why is None and factor_shapes(sketcher) is None:
        why = (f"{option('hessian', 'ekfac')} needs layers whose gradient is captured in "
               "factored form (linear or convolution layers on the hooked route); every "
               f"selected layer here is a flat parameter or captured exactly: use "
               f"{option('hessian', 'eFIM')}")
    if why:
        raise AttributionError(why)


@contextlib.contextmanager
def observing(sketcher, factors: KroneckerFactors):
    """The factored compressors report their compressed factors to ``factors`` meanwhile."""
    comps = [sketcher.compressors[name] for name in factors.shapes]
    for name, comp in zip(factors.shapes, comps):
        comp.observer = factors.observer(name)
    try:
        yield
    finally:
        for comp in comps:
            comp.observer = None


class Pass1Factors:
    """Pass 1's factor accumulation over a store's blocks: resumed from the saved state, with
    any blocks committed after the last checkpoint captured again (their rows are already
    stored; only the factors are recomputed), checkpointed as blocks are committed."""

    def __init__(self, store, shapes: dict[str, tuple[int, int]]):
        self.store, self.shapes = store, shapes
        saved = load_factors(store)
        committed = store.committed_blocks
        fresh = saved is None or saved.shapes != KroneckerFactors(shapes).shapes \
            or saved.blocks > committed
        self.factors = KroneckerFactors(shapes) if fresh else saved
        self._saved_at = time.monotonic()

    @property
    def blocks(self) -> int:
        return self.factors.blocks

    def capture(self, sketcher, fn):
        """Run ``fn()`` (one batch's sketch) with the observers on; close the batch."""
        with observing(sketcher, self.factors):
            out = fn()
        self.factors.end_batch()
        return out

    def committed(self, last: bool = False) -> None:
        """A block was committed: checkpoint now and then, and after the last one."""
        if last or time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            save_factors(self.store, self.factors)
            self._saved_at = time.monotonic()


def merge_shard_factors(store, shards: dict[int, "object"], n: int) -> None:
    """The shards' factor sums added in shard order into the main store (when every shard
    has complete ones); a merge that already did this is left alone."""
    if load_factors(store) is not None:
        return
    total = None
    for i in range(n):
        with SketchStore.open(shards[i], readonly=True) as reader:
            f = load_factors(reader)
            if f is None or f.blocks != reader.committed_blocks:
                return
        total = f if total is None else total.merge(f)
    if total is not None:
        save_factors(store, total)


def fit_ekfac(store, layout: dict, damping, progress) -> Preconditioner:
    """EK-FAC from the store's Kronecker factors and its sketches (one read for the corrected
    eigenvalues); layers without factors (flat parameters, exact capture) get eFIM from the
    same read."""
    factors = load_factors(store)
    meta = store.meta
    if factors is None:
        why = ekfac_unsupported(meta.get("sparsification", "?"), meta.get("projection", "?")) \
            if meta.get("sparsification") else None
        raise AttributionError(
            why or "this index holds no Kronecker factors (it was built before grass-index "
            "kept them, or under torchrun): EK-FAC needs the layer inputs and output "
            f"gradients of pass 1; rebuild it (same specs) to use {option('hessian', 'ekfac')}")
    if factors.blocks != store.committed_blocks:
        raise AttributionError(f"the Kronecker factors cover {factors.blocks} of "
                               f"{store.committed_blocks} sketched batches; re-run the build "
                               "to finish them")
    usable = [n for n in factors.usable() if n in layout]
    if not usable:
        raise AttributionError("no layer of this index has Kronecker factors (every layer is "
                               "a flat parameter or captured exactly), so EK-FAC is eFIM here; "
                               f"use {option('hessian', 'eFIM')}")
    rest = {name: k for name, k in layout.items() if name not in usable}
    why = {name: factors.missing.get(name, "not a factored layer (no Kronecker factors)")
           for name in rest}
    bases = {name: factors.eigenbases(name) for name in usable}
    n = store.num_rows
    dense = dense_layers(rest, n) if rest else []
    rest_slices = layer_slices(layout)
    fisher = ChunkedFisher(rest, only=dense) if dense else None
    cols = np.concatenate([np.arange(rest_slices[name].start, rest_slices[name].stop)
                           for name in rest]) if rest else None

    def blocks():
        for start, rows in store.iter_blocks():
            if fisher is not None:
                fisher.add(start, np.ascontiguousarray(rows[:, cols]))
            progress("fisher", start + len(rows), n)
            yield start, rows
    eig = corrected_eigenvalues(blocks(), layout, bases)
    rows = functools.cache(lambda: store.get_rows(np.arange(n)))  # low-rank eFIM layers only
    efim = None
    if rest:
        acc = fisher.finish() if fisher is not None else None
        efim = Preconditioner.fit_layers(
            rest, damping=damping, n=n,
            take_fisher=(lambda name: acc.take_sum(name) / n) if acc is not None else None,
            rows=lambda: rows()[:, cols])
    return Preconditioner.fit_ekfac(layout, bases, eig, damping=damping, efim=efim,
                                    efim_layers=why, rows=rows)
