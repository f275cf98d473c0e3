"""Checking an index directory part by part against its stored sketches and the store's own
records (config.json, build.json, the sketch blocks, the preconditioner, FAISS), and restoring
config.json / build.json from the store's copies. What can be rebuilt beyond that (the
preconditioner, FAISS, damaged sketch blocks) is the build's: ``grass_index.pipeline.repair``
(``verify_index``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..batching import batch_count
from ..fileio import UnsafeFileError, check_tree, read_json
from ..index import FaissIndexError, check_serves
from ..precondition import PreconditionError, load_preconditioner
from ..store import SketchStore, StoreError
from ..version import __version__
from .config import read_config, read_record
from .errors import AttributionError
from .files import BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, STORE_DIR, jsonable, write_json
from .fingerprints import config_hash, hash_json
from .generations import record_number, store_build, store_key
from .record import read_build_record
from .records import IndexRecord
from .scan import saturated_blocks, saturated_name, starts_of
from .stored import load_faiss

# what reading a damaged part raises (a corrupted array or file: a decoding ValueError)
UNREADABLE = (StoreError, OSError, ValueError)


@dataclass
class Findings:
    """The checks run so far ({"name", "ok", "detail"} each), and what a repair needs."""

    path: Path
    checks: list = field(default_factory=list)
    config: dict | None = None
    record: IndexRecord | None = None
    damaged: list = field(default_factory=list)  # sketch blocks failing their checksums

    def check(self, name: str, ok, detail="") -> bool:
        self.checks.append(dict(name=name, ok=bool(ok), detail=str(detail)))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def broken(self) -> set[str]:
        return {c["name"] for c in self.checks if not c["ok"]}

    def report(self, repaired: list[str]) -> dict:
        return dict(path=str(self.path), ok=self.ok, checks=self.checks, repaired=repaired)


def inspect_index(path, *, sample: int = 64, seed: int = 0, fast: bool = False) -> Findings:
    """Every check, in order; a part that later checks depend on (config.json, build.json,
    the store) stops the list when it fails. ``fast`` reads only sampled rows."""
    found = Findings(Path(path))
    view = check_config(found)
    check_files(found)  # reported even when config.json is unusable
    if view is None or not check_build_record(found):
        return found
    try:
        store = SketchStore.open(found.path / STORE_DIR, readonly=True)
    except UNREADABLE as e:
        found.check("sketch store", False, f"cannot open: {e}; the sketches are lost: rebuild")
        return found
    with store:
        check_store_files(found, store)
        check_store_config(found, store)
        check_generation(found, store, view)
        check_rows(found, store, view, fast=fast, sample=sample, seed=seed)
        pre = check_preconditioner(found, store, view)
        if view.held_in_store:
            check_scan(found, store, view, sample=sample, seed=seed)
        else:
            check_faiss(found, store, view, pre, sample=sample, seed=seed)
    return found


def check_files(found: Findings) -> None:
    """The file rule (grass_index/fileio.py): every entry a regular file or a real directory;
    a symlink, FIFO or device is reported (and never read or written by any command)."""
    tree = check_tree(found.path)
    found.check("files", not tree, "every entry is a regular file or a real directory"
                if not tree else "; ".join(tree[:5]) + ": remove it (grass-index never reads "
                "or writes through a symlink, FIFO or device)")


def check_store_files(found: Findings, store) -> None:
    """Array headers naming files that are not the store's own (and the store's tree)."""
    files = store.file_problems()
    found.check("store files", not files, "every file of the store is its own, regular file"
                if not files else "; ".join(files[:5]))


def check_config(found: Findings) -> IndexRecord | None:
    """config.json readable, its hash right, agreeing with the store; the format version."""
    try:
        view = found.record = read_record(found.path)
    except (AttributionError, UnsafeFileError) as e:
        found.check("config", False, e)
        return None
    found.config = dict(view.raw)
    found.check("config", True, f"config.json readable, hash {view.config_hash} matches, "
                                "agrees with the store's record")
    found.check("version", view.format == FORMAT_VERSION,
                f"built by grass-index {view.version} (format {view.format}); "
                f"this is {__version__} (format {FORMAT_VERSION})")
    return view


def check_build_record(found: Findings) -> bool:
    """build.json readable (else the later checks stop), matching config.json and the
    store's creation record."""
    try:
        build = read_build_record(found.path)
    except (OSError, ValueError) as e:  # AttributionError (corrupted) is a ValueError
        found.check("build record", False, f"{BUILD_FILE}: {e}")
        return False
    created = store_creation_record(found.path, found.record.generation.number)
    same_build = hash_json(build) == found.record.sketch_hash
    same_store = created is None or jsonable(build) == jsonable(created)
    found.check("build record", same_build and same_store,
                "build.json matches config.json and the store's creation record"
                if same_build and same_store else "build.json does not match config.json"
                if not same_build else "build.json is not the record the sketch store was "
                "created with (another build claimed the directory)")
    return True


def check_generation(found: Findings, store, view: IndexRecord) -> None:
    """A living index's generation (indexdir/generations.py): the store keeps the build
    record of it, the rows it added are stored, its removed ids are in range (the record's
    own checks) — and FAISS holds none of them (``check_faiss``)."""
    gen = view.generation
    problems = []
    if gen.number and not isinstance(store.get_meta(store_key(gen.number), None), dict):
        problems.append(f"the store has no build record of generation {gen.number}")
    if store.num_rows < gen.n_train:
        problems.append(f"the store holds {store.num_rows} rows, generation {gen.number} "
                        f"{gen.n_train}")
    found.check("generation", not problems, "; ".join(problems) if problems else
                f"generation {gen.number}: rows added {list(gen.added)}, "
                f"{len(gen.removed)} removed, {gen.n_live} of {gen.n_train} count")


def check_store_config(found: Findings, store) -> None:
    same = jsonable(store.get_meta("config", None)) == found.config
    found.check("store config", same, "LMDB config equals config.json" if same
                else "LMDB config differs from config.json")


def check_rows(found: Findings, store, view: IndexRecord, *, fast: bool, sample: int,
               seed: int) -> None:
    """Every block's checksum and every row (or, ``fast``, a sample of rows)."""
    n, bs = view.n_train, view.batch_size
    if fast:
        _sampled_rows(found, store, n, bs, sample, seed)
        return
    found.damaged = store.damaged_blocks()
    damaged = found.damaged
    found.check("sketch blocks", not damaged,
                f"{store.committed_blocks} blocks pass their checksums" if not damaged else
                f"{len(damaged)} blocks damaged on disk (checksum or header): {damaged[:20]}")
    if not damaged:
        _all_rows(found, store, view.dim, n, bs)


def check_preconditioner(found: Findings, store, view: IndexRecord):
    """The stored preconditioner of this variant, loadable and finite; None otherwise."""
    try:
        pre = load_preconditioner(store, view.preconditioner_key, dict(view.layout),
                                  rows=lambda: store.get_rows(view.generation.live_ids()))
    except (KeyError, PreconditionError, *UNREADABLE) as e:
        found.check("preconditioner", False, f"missing or unreadable ({e})")
        return None
    finite = all(bool(np.isfinite(v).all()) for v in pre.state_dict().values()
                 if np.asarray(v).dtype.kind == "f")
    found.check("preconditioner", finite, "finite" if finite else "contains NaN/inf")
    return pre if finite else None


def check_faiss(found: Findings, store, view: IndexRecord, pre, *, sample: int,
                seed: int) -> None:
    """The FAISS file(s): the count, sampled vectors equal to the preconditioned stored rows,
    and what a query checks before it answers (this build's key, ids 0..n-1)."""
    n, live = view.n_live, view.generation.live_ids()
    try:
        vindex = load_faiss(found.path, view, check=False)
    except (FaissIndexError, OSError) as e:
        found.check("faiss vs lmdb", False, f"{', '.join(view.index_files)} missing or "
                                            f"unreadable ({type(e).__name__}: {e})")
        return
    if vindex.ntotal != n:
        ok, detail = False, f"FAISS holds {vindex.ntotal} vectors, expected {n}"
    elif pre is None:
        ok, detail = True, f"{n} vectors (not compared: no preconditioner)"
    else:
        ok, detail = _compare_sample(store, vindex, pre, live, sample, seed)
    try:
        check_serves(vindex, view.preconditioner_key, n, "the FAISS file",
                     ids_below=view.n_train)
        held = np.intersect1d(vindex.ids(), np.asarray(view.removed, dtype=np.int64))
        if len(held):
            raise FaissIndexError(f"the FAISS file holds removed ids {held[:10].tolist()}")
    except FaissIndexError as e:
        ok, detail = False, f"{detail}; {e}"
    found.check("faiss vs lmdb", ok, detail)


def check_scan(found: Findings, store, view: IndexRecord, *, sample: int, seed: int) -> None:
    """An exact index held in the store (indexdir/scan.py) has no vectors of its own: its list
    of saturated blocks must be there, name live ids only, and agree with the stored rows of
    a sample (and the first and last live id)."""
    try:
        pairs = np.asarray(store.get_array(saturated_name(view.preconditioner_key)))
    except (KeyError, *UNREADABLE) as e:
        found.check("exact scan", False, f"its list of saturated blocks is missing or "
                                         f"unreadable ({type(e).__name__}: {e})")
        return
    live, layers = view.generation.live_mask(), len(view.layout)
    if pairs.ndim != 2 or pairs.shape[1:] != (2,) or pairs.dtype.kind not in "iu" or (
            len(pairs) and (pairs.min() < 0 or pairs[:, 0].max() >= len(live)
                            or pairs[:, 1].max() >= layers or not live[pairs[:, 0]].all())):
        found.check("exact scan", False, f"its list of saturated blocks {pairs.shape} "
                                         "names rows or layers the index does not have")
        return
    ids = view.generation.live_ids()
    rng = np.random.default_rng(seed)
    ids = ids[np.unique(np.concatenate([[0, len(ids) - 1],
                                        rng.integers(0, len(ids), min(sample, len(ids)))]))]
    try:
        rows = np.asarray(store.get_rows(ids), dtype=np.float32)
    except UNREADABLE as e:
        found.check("exact scan", False, f"sampled rows unreadable ({e})")
        return
    got = saturated_blocks(rows, starts_of(dict(view.layout)))
    want = pairs[np.isin(pairs[:, 0], ids)]
    same = np.array_equal(np.unique(np.column_stack([ids[got[:, 0]], got[:, 1]]), axis=0),
                          np.unique(want, axis=0))
    found.check("exact scan", same,
                f"{view.n_live} rows scanned from the store; {len(pairs)} saturated blocks, "
                f"{len(ids)} sampled ids agree" if same else
                "its list of saturated blocks disagrees with the stored rows")


def _compare_sample(store, vindex, pre, live: np.ndarray, sample: int,
                    seed: int) -> tuple[bool, str]:
    rng = np.random.default_rng(seed)
    n = len(live)
    ids = live[np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, min(sample, n))]))]
    try:
        want = np.asarray(pre.apply(np.asarray(store.get_rows(ids), dtype=np.float32)))
    except UNREADABLE as e:
        return False, f"sampled rows unreadable ({e})"
    want = getattr(vindex, "stored_form", lambda v: v)(want)  # search sketch
    got = np.asarray(vindex.reconstruct(ids.astype(np.int64)))
    err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
    # float16 storage rounds to 11 significant bits (relative 4.9e-4)
    ok = err < (2e-3 if vindex.dtype == "float16" else 1e-4)
    return ok, (f"{len(ids)} sampled ids agree with LMDB (max rel err {err:.1e})" if ok
                else f"FAISS vectors differ from LMDB (rel err {err:.1e})")


def store_creation_record(path: Path, generation: int = 0):
    """The build record the sketch store keeps for ``generation`` (its creation record for a
    plain build; None when unreadable)."""
    try:
        with SketchStore.open(path / STORE_DIR, readonly=True) as st:
            return store_build(st, generation)
    except UNREADABLE:
        return None


def restore_records(path: Path) -> list[str]:
    """Restore config.json and build.json from the store's own copies when they are missing,
    damaged or edited. Holds the store's writer lock, so never while a build runs."""
    done: list[str] = []
    try:
        store = SketchStore.open(path / STORE_DIR, readonly=False)
    except UNREADABLE:  # no store, or a build holds it: verify reports what is wrong
        return done
    with store:
        stored_cfg = store.get_meta("config", None)
        created = store_build(store, record_number(stored_cfg))
        bfile = path / BUILD_FILE
        try:
            old = read_json(bfile)
        except (OSError, ValueError):  # missing, damaged, or not a regular file: replaced
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
                          for k, v in created.items()) and _valid(stored_cfg))
        if usable:
            write_json(path / CONFIG_FILE, stored_cfg)
            done.append(f"restored {CONFIG_FILE} from the sketch store's copy")
    return done


def _valid(cfg: dict) -> bool:
    """A config the store holds is restored only when it is a valid record itself."""
    try:
        IndexRecord(cfg)
    except AttributionError:
        return False
    return True


def _counts(found: Findings, store, n: int, bs: int) -> None:
    """The rows and blocks of the index's generation; more rows (an add of a living index
    that was interrupted, or is running) are pending, not a fault: the generation ignores
    them, and the add resumes or rolls them back."""
    rows, blocks = store.num_rows, store.committed_blocks
    ok = rows >= n and blocks == batch_count(rows, bs)
    pending = (f"; {rows - n} more rows stored by an unfinished add (re-run it to finish it)"
               if rows > n else "")
    found.check("counts", ok, f"{rows} rows in {blocks} blocks; expected {n} rows in "
                f"{batch_count(n, bs)} blocks{pending}")


def _all_rows(found: Findings, store, dim: int, n: int, bs: int) -> None:
    """Read every block: each id exactly once, well-shaped, finite."""
    seen = np.zeros(n, dtype=np.int32)
    bad_rows, bad_shape = 0, 0
    try:
        for start, rows in store.iter_blocks():
            rows = np.asarray(rows)[:max(0, n - start)]  # the generation's rows
            if not len(rows):
                continue
            if rows.ndim != 2 or rows.shape[1] != dim or start + len(rows) > n:
                bad_shape += 1
                continue
            seen[start:start + len(rows)] += 1
            bad_rows += int((~np.isfinite(rows).all(axis=1)).sum())
    except UNREADABLE as e:
        found.check("sketch blocks", False, f"reading failed: {e}")
        return
    missing, dup = int((seen == 0).sum()), int((seen > 1).sum())
    _counts(found, store, n, bs)
    found.check("every id has a sketch", missing == 0 and dup == 0 and bad_shape == 0,
                f"{missing} missing, {dup} duplicated, {bad_shape} malformed blocks")
    found.check("sketches finite", bad_rows == 0, f"{bad_rows} rows with NaN/inf")


def _sampled_rows(found: Findings, store, n: int, bs: int, sample: int, seed: int) -> None:
    """fast mode: the counts from the commit record, and a sample of rows (first, last,
    random) instead of every block."""
    _counts(found, store, n, bs)
    ids = np.unique(np.concatenate([[0, n - 1],
                                    np.random.default_rng(seed).integers(0, n, min(sample, n))]))
    try:
        rows = np.asarray(store.get_rows(ids))
    except (*UNREADABLE, IndexError) as e:
        found.check("sketches finite", False, f"reading sampled rows failed: {e}")
        return
    ok = rows.shape == (len(ids), store.dim)
    bad = int((~np.isfinite(rows).all(axis=1)).sum()) if ok else len(ids)
    found.check("sketches finite", ok and bad == 0, f"{len(ids)} sampled rows: {bad} with "
                f"NaN/inf" if ok else f"sampled rows have shape {rows.shape}")
