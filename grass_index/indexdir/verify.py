"""verify_index: check an index directory against its stored sketches and the store's own
records; repair what they can rebuild (config.json, build.json, the preconditioner, the FAISS
index) and, given the task, the sketch blocks damaged on disk."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..index import FaissIndexError, check_serves
from ..precondition import load_preconditioner
from ..store import SketchStore
from .config import IndexConfig, read_config
from .errors import AttributionError
from .files import BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, STORE_DIR, jsonable, write_json
from .fingerprints import config_hash, hash_json, model_fingerprint
from ..pipeline.options import check_damping, norm_hessian
from ..pipeline.pass2 import load_faiss, refit
from ..query.querying import query_sketcher
from .record import batch_count, read_build_record
from ..pipeline.sketching import resketch_blocks


def verify_index(path, *, repair: bool = False, sample: int = 64, seed: int = 0,
                 fast: bool = False, task=None) -> dict:
    """Check an index directory; with repair=True rebuild what the store can: config.json
    (from the store's copy), build.json (from the store's creation record), the
    preconditioner and FAISS (from the stored sketches) and — when ``task`` (the task the
    index was built from: a reference or loaded task) is given — exactly the sketch blocks
    that are damaged on disk.

    ``fast=True`` (what a server runs at start) reads only the sampled rows, not every
    sketch: counts come from the store's commit record, and finiteness is checked on the
    sample, so it costs the same on a million examples as on a thousand.

    Returns {"ok": bool, "checks": [{"name", "ok", "detail"}], "repaired": [...]}.
    """
    path = Path(path)
    checks: list[dict] = []
    repaired: list[str] = _restore_records(path) if repair else []

    def check(name, ok, detail=""):
        checks.append(dict(name=name, ok=bool(ok), detail=str(detail)))
        return ok

    def report():
        return dict(path=str(path), ok=all(c["ok"] for c in checks), checks=checks,
                    repaired=repaired)

    try:
        cfg = read_config(path)
        view = IndexConfig(cfg)
        check("config", True, f"config.json readable, hash {view.config_hash} matches, "
                              "agrees with the store's record")
    except AttributionError as e:
        check("config", False, e)
        return report()
    check("version", cfg.get("format") == FORMAT_VERSION,
          f"built by grass-index {view.version} (format {cfg.get('format')}); "
          f"this is {__version__} (format {FORMAT_VERSION})")
    try:
        build = read_build_record(path)
    except (OSError, ValueError) as e:  # AttributionError (corrupted) is a ValueError
        check("build record", False, f"{BUILD_FILE}: {e}")
        return report()
    created = _store_creation_record(path)
    same_build = hash_json(build) == cfg.get("sketch_hash")
    same_store = created is None or jsonable(build) == jsonable(created)
    check("build record", same_build and same_store,
          "build.json matches config.json and the store's creation record" if same_build
          and same_store else "build.json does not match config.json" if not same_build else
          "build.json is not the record the sketch store was created with (another build "
          "claimed the directory)")

    n, bs = view.n_train, view.batch_size
    try:
        store = SketchStore.open(path / STORE_DIR, readonly=True)
    except Exception as e:
        check("sketch store", False, f"cannot open: {e}; the sketches are lost: rebuild")
        return report()
    pre, damaged = None, []
    try:
        meta_ok = jsonable(store.get_meta("config", None)) == cfg
        check("store config", meta_ok, "LMDB config equals config.json" if meta_ok
              else "LMDB config differs from config.json")
        if fast:
            _sampled_rows(check, store, n, bs, sample, seed)
        else:
            damaged = store.damaged_blocks()
            check("sketch blocks", not damaged,
                  f"{store.committed_blocks} blocks pass their checksums" if not damaged else
                  f"{len(damaged)} blocks damaged on disk (checksum or header): {damaged[:20]}")
            if not damaged:
                _all_rows(check, store, view.dim, n, bs)
        try:
            pre = load_preconditioner(store, view.preconditioner_key, view.layout)
            finite = all(bool(np.isfinite(v).all()) for v in pre.state_dict().values()
                         if np.asarray(v).dtype.kind == "f")
            check("preconditioner", finite, "finite" if finite else "contains NaN/inf")
            if not finite:
                pre = None
        except Exception as e:
            check("preconditioner", False, f"missing or unreadable ({e})")

        names = view.index_files
        faiss_ok, detail = False, ""
        try:
            vindex = load_faiss(path, cfg, check=False)
            if vindex.ntotal != n:
                detail = f"FAISS holds {vindex.ntotal} vectors, expected {n}"
            elif pre is not None:
                rng = np.random.default_rng(seed)
                ids = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, min(sample, n))]))
                want = np.asarray(pre.apply(np.asarray(store.get_rows(ids), dtype=np.float32)))
                want = getattr(vindex, "stored_form", lambda v: v)(want)  # search sketch
                got = np.asarray(vindex.reconstruct(ids.astype(np.int64)))
                err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
                # float16 storage rounds to 11 significant bits (relative 4.9e-4)
                faiss_ok = err < (2e-3 if vindex.dtype == "float16" else 1e-4)
                detail = (f"{len(ids)} sampled ids agree with LMDB (max rel err {err:.1e})"
                          if faiss_ok else f"FAISS vectors differ from LMDB (rel err {err:.1e})")
            else:
                faiss_ok, detail = True, f"{n} vectors (not compared: no preconditioner)"
            try:  # what a query checks before it answers: this build's key, ids 0..n-1
                check_serves(vindex, view.preconditioner_key, n, "the FAISS file")
            except FaissIndexError as e:
                faiss_ok, detail = False, f"{detail}; {e}"
        except Exception as e:
            detail = f"{', '.join(names)} missing or unreadable ({type(e).__name__}: {e})"
        check("faiss vs lmdb", faiss_ok, detail)
    finally:
        store.close()

    if repair and not all(c["ok"] for c in checks):
        broken = {c["name"] for c in checks if not c["ok"]}
        if "sketch blocks" in broken and task is not None:
            repaired.append(_recompute_blocks(path, cfg, damaged, task))
            broken -= {"sketch blocks", "counts", "every id has a sketch", "sketches finite"}
        fixable = {"faiss vs lmdb", "preconditioner", "store config"}
        if broken <= fixable:
            if broken:
                hessian = norm_hessian(view.hessian)  # what AttributionIndex.reprecondition does
                damping = _parse_saved_damping(view.damping)
                check_damping(damping)
                refit(path, cfg, hessian=hessian, damping=damping,
                      index=view.index_kind or "flat")
                repaired.append("rebuilt the preconditioner and the FAISS index from the "
                                "stored sketches")
            again = verify_index(path, repair=False, sample=sample, seed=seed, fast=fast)
            again["repaired"] = repaired
            return again
        if "sketch blocks" in broken:
            repaired.append(f"sketch blocks {damaged[:20]} are damaged: run `grass-index verify "
                            f"{path} --repair --task FILE` with the task the index was built "
                            "from to recompute exactly those blocks")
        else:
            repaired.append(f"cannot repair {sorted(broken - fixable)} from the stored "
                            "sketches; re-run the build (it resumes from the last committed "
                            "batch)")
    return report()


def _store_creation_record(path: Path):
    """The build record the sketch store was created with (None when unreadable)."""
    try:
        with SketchStore.open(path / STORE_DIR, readonly=True) as st:
            return st.meta
    except Exception:
        return None


def _restore_records(path: Path) -> list[str]:
    """Restore config.json and build.json from the store's own copies when they are missing,
    damaged or edited. Holds the store's writer lock, so never while a build runs."""
    done: list[str] = []
    try:
        store = SketchStore.open(path / STORE_DIR, readonly=False)
    except Exception:  # no store, or a build holds it: verify reports what is wrong
        return done
    with store:
        created, stored_cfg = store.meta, store.get_meta("config", None)
        bfile = path / BUILD_FILE
        try:
            old = json.loads(bfile.read_text())
        except (OSError, ValueError):
            old = None
        if jsonable(old) != jsonable(created):
            write_json(bfile, created)
            done.append(f"restored {BUILD_FILE} from the sketch store's creation record")
        try:
            read_config(path)
            return done
        except AttributionError:
            pass
        usable = (isinstance(stored_cfg, dict)
                  and stored_cfg.get("config_hash") == config_hash(stored_cfg)
                  and all(jsonable(stored_cfg.get(k)) == jsonable(v)
                          for k, v in created.items()))
        if usable:
            write_json(path / CONFIG_FILE, stored_cfg)
            done.append(f"restored {CONFIG_FILE} from the sketch store's copy")
    return done


def _recompute_blocks(path: Path, cfg: dict, damaged: list[int], task) -> str:
    """Sketch exactly the damaged blocks again from the task, after checking that its model
    and data are the ones the index was built from."""
    from ..task import Task, load_task

    t = task if isinstance(task, Task) else load_task(task)
    model, data = t.index_model(), t.train_data()  # an ensemble: its checkpoints
    if len(data) != int(cfg["n_train"]):
        raise AttributionError(f"task {t.ref} has {len(data)} training examples but the index "
                               f"was built over {cfg['n_train']}; pass the task it was built "
                               "from")
    if model_fingerprint(model) != cfg.get("model_hash"):
        raise AttributionError(f"the model of task {t.ref} differs from the one the index was "
                               "built with (model fingerprint); pass the task it was built from")
    sketcher = query_sketcher(path, cfg, model)
    with SketchStore.open(path / STORE_DIR, readonly=False) as store:
        resketch_blocks(store, sketcher, data, t.loss, damaged,
                        batch_size=int(cfg["batch_size"]), collate=t.collate)
    return f"recomputed sketch blocks {damaged[:20]} from task {t.ref}"


def _counts(check, store, n: int, bs: int) -> None:
    check("counts", store.num_rows == n and store.committed_blocks == batch_count(n, bs),
          f"{store.num_rows} rows in {store.committed_blocks} blocks; expected {n} rows in "
          f"{batch_count(n, bs)} blocks")


def _all_rows(check, store, dim: int, n: int, bs: int) -> None:
    """Read every block: each id exactly once, well-shaped, finite."""
    seen = np.zeros(n, dtype=np.int32)
    bad_rows, bad_shape = 0, 0
    try:
        for start, rows in store.iter_blocks():
            rows = np.asarray(rows)
            if rows.ndim != 2 or rows.shape[1] != dim or start + len(rows) > n:
                bad_shape += 1
                continue
            seen[start:start + len(rows)] += 1
            bad_rows += int((~np.isfinite(rows).all(axis=1)).sum())
    except Exception as e:
        check("sketch blocks", False, f"reading failed: {e}")
        return
    missing, dup = int((seen == 0).sum()), int((seen > 1).sum())
    _counts(check, store, n, bs)
    check("every id has a sketch", missing == 0 and dup == 0 and bad_shape == 0,
          f"{missing} missing, {dup} duplicated, {bad_shape} malformed blocks")
    check("sketches finite", bad_rows == 0, f"{bad_rows} rows with NaN/inf")


def _sampled_rows(check, store, n: int, bs: int, sample: int, seed: int) -> None:
    """fast mode: the counts from the commit record, and a sample of rows (first, last,
    random) instead of every block."""
    _counts(check, store, n, bs)
    ids = np.unique(np.concatenate([[0, n - 1],
                                    np.random.default_rng(seed).integers(0, n, min(sample, n))]))
    try:
        rows = np.asarray(store.get_rows(ids))
    except Exception as e:
        check("sketches finite", False, f"reading sampled rows failed: {e}")
        return
    ok = rows.shape == (len(ids), store.dim)
    bad = int((~np.isfinite(rows).all(axis=1)).sum()) if ok else len(ids)
    check("sketches finite", ok and bad == 0, f"{len(ids)} sampled rows: {bad} with NaN/inf"
          if ok else f"sampled rows have shape {rows.shape}")


def _parse_saved_damping(d):
    if d is None:
        return None
    try:
        return float(d)
    except ValueError:
        return d
