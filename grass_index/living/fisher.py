"""The Fisher sums of the next generation from the cached ones: Σ ĝĝᵀ of every dense layer
(n ≥ k) gains the new rows and loses the removed rows' raw sketches (both read back from the
store), so neither an add nor a remove re-reads the n rows that stay. A layer in the low-rank
form (n < k) keeps no sums: pass 2 fits it from the rows that count."""
from __future__ import annotations

import numpy as np

from ..indexdir.generations import Generation
from ..pipeline.pass2 import has_fisher
from ..precondition import FisherAccumulator, dense_layers


def update_fisher(store, layout: dict, old: Generation, new: Generation, hessian: str) -> bool:
    """Cache the next generation's F_l (= Σ/n over its rows that count) where pass 2 looks
    first; False when there is nothing to update from (no dense layer, or no cache of ``old``:
    then pass 2 sums the rows that count itself). The flag goes first and last, so an update
    killed half-way leaves no cache a generation could take for its own."""
    dense = dense_layers(layout, new.n_live)
    if hessian != "eFIM" or not dense or not has_fisher(store, dense, old):
        return False
    plus = _added_sums(store, layout, dense, old.n_train, new.n_train)
    gone = sorted(set(new.removed) - set(old.removed))
    minus = None
    if gone:
        minus = FisherAccumulator(layout, only=dense)
        minus.update(store.get_rows(np.asarray(gone, dtype=np.int64)))
    store.put_meta("fisher_done", False)
    for name in dense:
        total = np.array(store.get_array(f"fisher/{name}"), dtype=np.float64) * old.n_live
        if plus is not None:
            total += plus.take_sum(name)
        if minus is not None:
            total -= minus.take_sum(name)
        total /= new.n_live
        store.put_array(f"fisher/{name}", total)
    store.put_meta("fisher_n", int(new.n_live))
    store.put_meta("fisher_generation", new.tag)
    store.put_meta("fisher_done", True)
    return True


def _added_sums(store, layout: dict, dense: list, lo: int, hi: int):
    """Σ ĝĝᵀ over the stored rows with ids lo..hi-1 (None when there are none)."""
    if hi <= lo:
        return None
    acc = FisherAccumulator(layout, only=dense)
    for start, rows in store.iter_blocks(_first_block(store, lo)):
        if start >= hi:
            break
        keep = rows[max(0, lo - start):hi - start]
        if len(keep):
            acc.update(keep)
    return acc


def _first_block(store, row: int) -> int:
    """The block holding id ``row`` (blocks are full batches but the last)."""
    size = store.meta.get("batch_size") or 1
    return min(row // size, max(store.committed_blocks - 1, 0))
