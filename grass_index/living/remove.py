"""Removing training examples from a living index: the next generation leaves them out of the
Fisher (their raw sketches' ĝĝᵀ subtracted from the cached sums) and out of FAISS, and every
reader skips them (query, score, self-influence, serve). Their rows stay in the store: ids
never shift, and every other example keeps its id."""
from __future__ import annotations

import numpy as np

from ..indexdir.config import check_index_dir, read_record
from ..indexdir.errors import AttributionError
from ..indexdir.files import STORE_DIR
from ..pipeline.progress import Progress
from ..store import SketchStore
from .commit import commit_generation, recorded_build, refuse_ekfac, settle


def check_ids(ids, record) -> list[int]:
    """The ids to remove, checked against ``record``: integers, in range, not yet removed,
    not every example; one error naming every offender."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise AttributionError(f"ids must be a list of training ids, got {type(ids).__name__}")
    ids = list(ids)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise AttributionError(f"training ids must be integers, got {bad[:5]}")
    if not ids:
        raise AttributionError("no ids to remove; give at least one training id")
    n = record.n_train
    out = sorted({int(i) for i in ids if not 0 <= int(i) < n})
    if out:
        raise AttributionError(f"training ids {out[:10]} are out of range: the index holds ids "
                               f"0..{n - 1}")
    again = sorted(set(map(int, ids)) & set(record.removed))
    if again:
        raise AttributionError(f"training ids {again[:10]} are already removed (in an earlier "
                               "generation); leave them out")
    dup = sorted({int(i) for i in ids if list(map(int, ids)).count(int(i)) > 1})
    if dup:
        raise AttributionError(f"training ids {dup[:10]} are given more than once")
    if len(ids) + len(record.removed) >= n:
        raise AttributionError(f"removing {len(ids)} ids would leave no training example "
                               f"(the index holds {record.n_live}); build a new index instead")
    return sorted(map(int, ids))


def remove_examples(path, ids, *, progress=False) -> dict:
    """Remove training examples ``ids`` from the index in ``path``: a new generation, committed
    atomically (a reader keeps its snapshot until it picks up the new one). Returns the new
    config."""
    path = check_index_dir(path)
    settle(path)
    record = read_record(path)
    refuse_ekfac(record, "remove examples from")
    check_ids(ids, record)
    prog = Progress(progress)
    try:
        with SketchStore.open(path / STORE_DIR, readonly=False) as store:
            record = read_record(path)  # under the writer lock: the generation we extend
            ids = check_ids(ids, record)
            gen = record.generation.without(ids)
            prog.note(f"removing {len(ids)} training example(s): generation {gen.number}, "
                      f"{gen.n_live} of {gen.n_train} examples count")
            return commit_generation(path, store, record, recorded_build(store, record), gen,
                                     progress=prog)
    finally:
        prog.close()
