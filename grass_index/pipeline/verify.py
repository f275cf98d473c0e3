"""verify_index: check an index directory against its stored sketches; repair what pass 2
can rebuild from them (the preconditioner, the FAISS index, the store's config)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from ..precondition import load_preconditioner
from ..store import SketchStore
from .config import IndexConfig, read_config
from .errors import AttributionError
from .files import BUILD_FILE, FORMAT_VERSION, STORE_DIR, jsonable
from .fingerprints import hash_json
from .options import check_damping, norm_hessian
from .pass2 import load_faiss, refit
from .record import batch_count, read_build_record


def verify_index(path, *, repair: bool = False, sample: int = 64, seed: int = 0) -> dict:
    """Check an index directory; with repair=True rebuild FAISS from the stored sketches.

    Returns {"ok": bool, "checks": [{"name", "ok", "detail"}], "repaired": [...]}.
    """
    path = Path(path)
    checks: list[dict] = []
    repaired: list[str] = []

    def check(name, ok, detail=""):
        checks.append(dict(name=name, ok=bool(ok), detail=str(detail)))
        return ok

    def report():
        return dict(path=str(path), ok=all(c["ok"] for c in checks), checks=checks,
                    repaired=repaired)

    try:
        cfg = read_config(path)
        view = IndexConfig(cfg)
        check("config", True, f"config.json readable, hash {view.config_hash} matches")
    except AttributionError as e:
        check("config", False, e)
        return report()
    check("version", cfg.get("format") == FORMAT_VERSION,
          f"built by grass-index {view.version} (format {cfg.get('format')}); "
          f"this is {__version__} (format {FORMAT_VERSION})")
    try:
        build = read_build_record(path)
        check("build record", hash_json(build) == cfg.get("sketch_hash"),
              "build.json matches config" if hash_json(build) == cfg.get("sketch_hash")
              else "build.json does not match config.json")
    except (OSError, ValueError) as e:
        check("build record", False, f"{BUILD_FILE}: {e}")
        return report()

    n, bs = view.n_train, view.batch_size
    try:
        store = SketchStore.open(path / STORE_DIR, readonly=True)
    except Exception as e:
        check("sketch store", False, f"cannot open: {e}; the sketches are lost: rebuild")
        return report()
    pre = None
    try:
        meta_ok = jsonable(store.get_meta("config", None)) == cfg
        check("store config", meta_ok, "LMDB config equals config.json" if meta_ok
              else "LMDB config differs from config.json")
        seen = np.zeros(n, dtype=np.int32)
        bad_rows, bad_shape, count = 0, 0, 0
        try:
            for start, rows in store.iter_blocks():
                rows = np.asarray(rows)
                if rows.ndim != 2 or rows.shape[1] != view.dim or start + len(rows) > n:
                    bad_shape += 1
                    continue
                seen[start:start + len(rows)] += 1
                bad_rows += int((~np.isfinite(rows).all(axis=1)).sum())
                count += len(rows)
            read_ok = True
        except Exception as e:
            read_ok = check("sketch blocks", False, f"reading failed: {e}")
        if read_ok:
            missing, dup = int((seen == 0).sum()), int((seen > 1).sum())
            check("counts", store.num_rows == n and store.committed_blocks == batch_count(n, bs),
                  f"{store.num_rows} rows in {store.committed_blocks} blocks; expected {n} rows in "
                  f"{batch_count(n, bs)} blocks")
            check("every id has a sketch", missing == 0 and dup == 0 and bad_shape == 0,
                  f"{missing} missing, {dup} duplicated, {bad_shape} malformed blocks")
            check("sketches finite", bad_rows == 0, f"{bad_rows} rows with NaN/inf")
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
            vindex = load_faiss(path, cfg)
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
        except Exception as e:
            detail = f"{', '.join(names)} missing or unreadable ({type(e).__name__}: {e})"
        check("faiss vs lmdb", faiss_ok, detail)
    finally:
        store.close()

    if repair and not all(c["ok"] for c in checks):
        fixable = {"faiss vs lmdb", "preconditioner", "store config"}
        broken = {c["name"] for c in checks if not c["ok"]}
        if broken <= fixable:
            hessian = norm_hessian(view.hessian)  # what AttributionIndex.reprecondition does
            damping = _parse_saved_damping(view.damping)
            check_damping(damping)
            refit(path, cfg, hessian=hessian, damping=damping,
                  index=view.index_kind or "flat")
            repaired.append("rebuilt the preconditioner and the FAISS index from the stored "
                            "sketches")
            again = verify_index(path, repair=False, sample=sample, seed=seed)
            again["repaired"] = repaired
            return again
        repaired.append(f"cannot repair {sorted(broken - fixable)} from the stored sketches; "
                        "re-run the build (it resumes from the last committed batch)")
    return report()


def _parse_saved_damping(d):
    if d is None:
        return None
    try:
        return float(d)
    except ValueError:
        return d
