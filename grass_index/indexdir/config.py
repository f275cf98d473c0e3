"""config.json, the record of a finished index: reading it, checking it (format, hash, file
names, agreement with the sketch store's own records, every field's type and range:
indexdir/records.py) and handing readers the typed record (``read_record``).

config.json holds build.json's keys plus what pass 2 did (``hessian``, ``damping``,
``damping_used``, ``preconditioner``, ``index``, ``index_kind``, ``index_files``, ...), the
versions that wrote it and ``config_hash`` over all of it but ``created``; it is written last
and atomically, so an index is complete exactly when config.json exists.
"""
from __future__ import annotations

from pathlib import Path

from ..version import __version__
from ..fileio import UnsafeFileError, check_regular, read_json
from ..store import SketchStore, StoreError
from ..errors import repair_command, spelled
from ..untrusted import UnsafeNameError, plain_file_name
from .errors import AttributionError
from .files import BUILD_FILE, CONFIG_FILE, FORMAT_VERSION, STORE_DIR, jsonable
from .fingerprints import config_hash
from .generations import record_number, store_build
from .record import check_directory, sketched_batches
from .records import IndexRecord


def read_config(path: Path) -> dict:
    """config.json of the index in ``path`` as a dict, after ``read_record``'s checks."""
    return dict(read_record(path).raw)


def check_index_dir(path) -> Path:
    """``path`` names a directory (the one a command is to read or change); else one line:
    not found, or a file, and how to make an index."""
    return check_directory(path, "index directory", "build one with " + spelled(
        "`grass-index build TASK --out DIR`", "grass_index.build_index(..., out=DIR)"))


def read_record(path) -> IndexRecord:
    """The typed record of the finished index in ``path``, checked once: format, hash, plain
    file names, agreement with the sketch store's own records, every field's type and range
    (indexdir/records.py); clear errors for a missing, unfinished, corrupted, modified or
    foreign directory."""
    path = check_index_dir(path)
    cfile = path / CONFIG_FILE
    if not check_regular(cfile):  # a symlink, FIFO or directory there is refused
        if check_regular(path / BUILD_FILE):
            raise AttributionError(unfinished(path))
        raise AttributionError(f"{path} is not a grass-index index (no {CONFIG_FILE}); pass the "
                               + spelled("--out directory of `grass-index build`",
                                         "out directory of build_index()"))
    try:
        cfg = read_json(cfile)
    except ValueError as e:
        raise AttributionError(f"{cfile} is corrupted ({e}); run {repair_command(path)} to "
                               "restore it from the sketch store") from e
    if not isinstance(cfg, dict) or cfg.get("library") != "grass-index":
        raise AttributionError(f"{cfile} is not a grass-index config; rebuild the index")
    fmt = cfg.get("format")
    if fmt != FORMAT_VERSION:  # older formats (or none) are as unreadable as newer ones
        newer = isinstance(fmt, int) and fmt > FORMAT_VERSION
        raise AttributionError(f"{path} was written by grass-index {cfg.get('version')} (format "
                               f"{fmt}); this is {__version__} (format {FORMAT_VERSION}): "
                               + ("upgrade grass-index" if newer else
                                  "rebuild the index with this version"))
    if cfg.get("config_hash") != config_hash(cfg):
        raise AttributionError(f"{cfile} was modified after the build (config hash mismatch); "
                               f"run {repair_command(path)} to restore it from the sketch "
                               "store")
    check_file_names(path, cfg)
    rows = _check_against_store(path, cfg)
    record = IndexRecord(cfg, str(cfile))  # every field's type and range, and their agreement
    if rows is not None and record.n_train > rows:
        raise AttributionError(f"{cfile}: field 'n_train' ({record.n_train}) is more than the "
                               f"{rows} rows the sketch store holds; run "
                               f"{repair_command(path)} or rebuild the index")
    return record


def unfinished(path: Path) -> str:
    """What to do about a build directory without config.json."""
    done = sketched_batches(path)
    if done and done[0] >= done[1]:
        return (f"the build in {path} is not finished: pass 1 is complete ({done[0]} of "
                f"{done[1]} batches sketched) but pass 2 did not finish; re-run the build "
                "command: only pass 2 runs again (if it refused the damping, give another: "
                + spelled("add --damping 0.3 or --hessian identity",
                          "damping=0.3 or hessian='identity'") + ")")
    progress = f" ({done[0]} of {done[1]} batches sketched)" if done else ""
    return (f"the build in {path} is not finished{progress}; re-run the same build "
            + spelled("command", "call") + " to resume it")


def check_file_names(path: Path, cfg: dict) -> None:
    """File names a config points at are plain names inside the index directory."""
    try:
        for name in [cfg.get("index_file")] + list(cfg.get("index_files") or []):
            if name is None and (cfg.get("index") or {}).get("held") == "store":
                continue  # no FAISS file: the exact index scans the store (index/store_scan.py)
            plain_file_name(name, f"{path / CONFIG_FILE}: index file")
    except UnsafeNameError as e:
        raise AttributionError(str(e).replace("DIR", str(path))) from None


# Fields of config.json that the store's own records fix for the life of a build (every refit
# keeps them); the config hash is unkeyed, so anyone can edit config.json and re-hash it.
TASK_FIELDS = ("task", "task_sha256")


def config_store_diff(path: Path, cfg: dict) -> list[str] | None:
    """Fields where ``cfg`` disagrees with the sketch store's creation record (the build) and
    its copy of the config (the task); None when the store cannot be read."""
    seen = _store_records(path, record_number(cfg))
    return None if seen is None else _diff(cfg, *seen[:2])


def _store_records(path: Path, generation: int = 0):
    """(build record of ``generation``, copy of the config, rows) of the sketch store: the
    creation record, or a grown generation's (indexdir/generations.py); None when
    unreadable."""
    try:
        with SketchStore.open(Path(path) / STORE_DIR, readonly=True) as st:
            return store_build(st, generation), st.get_meta("config", None), st.num_rows
    except UnsafeFileError:  # a symlink/FIFO in the store: refused, not "unreadable"
        raise
    except (StoreError, OSError, ValueError):
        return None


def _diff(cfg: dict, created: dict, stored) -> list[str]:
    diff = [k for k in sorted(created) if jsonable(created[k]) != jsonable(cfg.get(k))]
    # the store's copy of a newer generation (a change committing, or killed before its
    # config.json) may record another task file: the old generation stays readable
    if isinstance(stored, dict) and record_number(stored) == record_number(cfg):
        diff += [k for k in TASK_FIELDS if stored.get(k) != cfg.get(k)]
    return diff


def _check_against_store(path: Path, cfg: dict) -> int | None:
    """Refuse a config that disagrees with the store's records; the rows the store holds
    (None when it cannot be read: then the queries that need it say so)."""
    seen = _store_records(path, record_number(cfg))
    if seen is None:
        return None
    created, stored, rows = seen
    diff = _diff(cfg, created, stored)
    if diff:
        raise AttributionError(
            f"{path / CONFIG_FILE} disagrees with the sketch store's own record of this build "
            f"(differs in: {', '.join(diff)}): it was edited, or belongs to another build; run "
            f"{repair_command(path)} to restore it from the store")
    return rows


# The typed, validated config.json (read-only): its older name, kept for readers and the API.
IndexConfig = IndexRecord
