"""verify_index: check an index directory (grass_index.indexdir.verify) and, with repair,
rebuild what the store can: config.json and build.json (from the store's own copies), the
preconditioner and FAISS (pass 2 again over the stored sketches) and — given the task — exactly
the sketch blocks that are damaged on disk."""
from __future__ import annotations

from os import PathLike
from pathlib import Path

from .. import arguments
from ..errors import spelled
from ..indexdir.errors import AttributionError
from ..indexdir.fingerprints import model_fingerprint
from ..indexdir.files import STORE_DIR
from ..indexdir.records import IndexRecord
from ..indexdir.verify import inspect_index, restore_records
from ..query.querying import query_sketcher
from ..store import SketchStore
from .options import IndexOptions
from .pass2 import refit
from .sketching import resketch_blocks

# what pass 2 rebuilds from the stored sketches
REFITTABLE = {"faiss vs lmdb", "exact scan", "preconditioner", "store config"}
# what recomputing the damaged blocks mends
RESKETCHED = {"sketch blocks", "counts", "every id has a sketch", "sketches finite"}


def verify_index(path, *, repair: bool = False, sample: int = 64, seed: int = 0,
                 fast: bool = False, task=None) -> dict:
    """Check an index directory; with repair=True rebuild what the store can: config.json
    (from the store's copy), build.json (from the store's creation record), the
    preconditioner and FAISS (from the stored sketches) and — when ``task`` (the task the
    index was built from, loaded: ``grass_index.verify_index`` loads a reference) is given —
    exactly the sketch blocks that are damaged on disk.

    ``fast=True`` (what a server runs at start) reads only the sampled rows, not every
    sketch: counts come from the store's commit record, and finiteness is checked on the
    sample, so it costs the same on a million examples as on a thousand.

    Returns {"ok": bool, "checks": [{"name", "ok", "detail"}], "repaired": [...]}.
    """
    path = arguments.directory(path, "verify_index")
    repaired: list[str] = restore_records(path) if repair else []
    found = inspect_index(path, sample=sample, seed=seed, fast=fast)
    if not repair or found.ok:
        return found.report(repaired)
    broken = found.broken()
    if "sketch blocks" in broken and task is not None:
        repaired.append(_recompute_blocks(path, found.config, found.damaged, task))
        broken -= RESKETCHED
    if broken <= REFITTABLE:
        if broken:
            _refit(path, found.config)
            repaired.append("rebuilt the preconditioner and the FAISS index from the "
                            "stored sketches")
        again = inspect_index(path, sample=sample, seed=seed, fast=fast)
        return again.report(repaired)
    if "sketch blocks" in broken:
        rerun = spelled(f"`grass-index verify {path} --repair --task FILE`",
                        f"verify_index({str(path)!r}, repair=True, task='FILE')")
        repaired.append(f"sketch blocks {found.damaged[:20]} are damaged: run {rerun} with the "
                        "task the index was built from to recompute exactly those blocks")
    else:
        repaired.append(f"cannot repair {sorted(broken - REFITTABLE)} from the stored "
                        "sketches; re-run the build (it resumes from the last committed "
                        "batch)")
    return found.report(repaired)


def _refit(path: Path, cfg: dict) -> None:
    """Pass 2 again with the options config.json records (what AttributionIndex.reprecondition
    does)."""
    refit(path, cfg, IndexOptions(hessian=cfg["hessian"],
                                  damping=_parse_saved_damping(cfg.get("damping")),
                                  index=cfg.get("index_kind") or "flat"))


def _recompute_blocks(path: Path, cfg: dict, damaged: list[int], task) -> str:
    """Sketch exactly the damaged blocks again from the task, after checking that its model
    and data are the ones the index was built from."""
    if isinstance(task, (str, PathLike)):
        raise AttributionError("repair re-sketches with a loaded task: pass "
                               f"grass_index.load_task({str(task)!r})")
    t = task
    model, data = t.index_model(), t.train_data()  # an ensemble: its checkpoints
    if len(data) != int(cfg["n_train"]):
        raise AttributionError(f"task {t.ref} has {len(data)} training examples but the index "
                               f"was built over {cfg['n_train']}; pass the task it was built "
                               "from")
    recorded = cfg.get("model_hash")
    if model_fingerprint(model, like=recorded) != recorded:
        raise AttributionError(f"the model of task {t.ref} differs from the one the index was "
                               "built with (model fingerprint); pass the task it was built from")
    sketcher = query_sketcher(path, IndexRecord(cfg), model)
    with SketchStore.open(path / STORE_DIR, readonly=False) as store:
        resketch_blocks(store, sketcher, data, t.loss, damaged,
                        batch_size=int(cfg["batch_size"]), collate=t.collate)
    return f"recomputed sketch blocks {damaged[:20]} from task {t.ref}"


def _parse_saved_damping(d):
    if d is None:
        return None
    try:
        return float(d)
    except ValueError:
        return d
