"""The pipeline that ties the stages together: build_index / open_index / query / score.

An index directory holds

    build.json      what the raw sketches depend on (specs, seed, layers, model/data hashes);
                    written once when the build starts, so a re-run can resume or refuse
    sketches/       LMDB store: raw sketches in blocks of ``batch_size`` rows (pass 1), the
                    per-layer Fisher matrices and the preconditioner (pass 2), the config
    index-KEY.faiss inner-product index over the preconditioned sketches (ids = train ids)
    config.json     the self-describing config; written last and atomically, so an index
                    is complete exactly when config.json exists

Pass 1 commits one block per batch (resumable at ``store.committed_blocks``); pass 2 reads
the blocks back, so changing the damping or the Hessian never recomputes a gradient.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import __version__
from .capture import CaptureError, GradientSketcher, select_layers
from .compress import load_selective_mask
from .precondition import FisherAccumulator, Preconditioner, parse_damping
from .store import SketchStore, StoreError
from .index import VectorIndex
from .task import (TaskError, check_loss, default_collate, item_signature, merge_signatures,
                   signature_mismatch)

log = logging.getLogger("grass_index")

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
BUILD_FILE = "build.json"
STORE_DIR = "sketches"
MASK_FILE = "selective_mask.pt"  # copy of the selective-mask file, so queries need only the dir
HESSIANS = {"efim": "eFIM", "identity": "identity"}
INDEX_KINDS = ("flat", "ivf")
_OUR_FILES = {CONFIG_FILE, BUILD_FILE, STORE_DIR}


class AttributionError(ValueError):
    """Bad input or a broken index directory; the message names the problem and the fix."""


# ------------------------------------------------------------------------------- helpers

def _jsonable(x):
    """Config values as plain JSON (tensors/arrays -> lists, tuples -> lists)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def model_hash(model: torch.nn.Module, layers) -> str:
    """Fingerprint of the attributed parameters (a different model must not resume a build)."""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for layer in layers:
        for name in layer.param_names:
            h.update(name.encode())
            h.update(_tensor_bytes(params[name]))
    return h.hexdigest()[:16]


def _leaves(x, out):
    if isinstance(x, torch.Tensor):
        out.append(_tensor_bytes(x))
    elif isinstance(x, np.ndarray):
        out.append(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            _leaves(x[k], out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _leaves(v, out)
    else:
        out.append(repr(x).encode())
    return out


def data_hash(data: Sequence) -> str:
    """Cheap fingerprint of a training set: its length and its first and last examples."""
    n = len(data)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({0, n - 1}):
        for b in _leaves(data[i], []):
            h.update(b)
    return h.hexdigest()[:16]


def _data_signature(data: Sequence):
    sig = None
    for i in sorted({0, min(1, len(data) - 1), len(data) - 1}):
        sig = merge_signatures(sig, item_signature(data[i]))
    return sig


def _layer_dims(layers) -> list[dict]:
    return [dict(name=l.name, kind=l.kind, d_in=l.d_in, d_out=l.d_out, has_bias=l.has_bias,
                 numel=l.numel, params=list(l.param_names)) for l in layers]


class _Progress:
    """progress=True: a rich bar on stderr (off when not a terminal); a callable gets
    (stage, done, total) and is how the CLI and tests observe a running build."""

    def __init__(self, progress):
        self.cb = progress if callable(progress) else None
        self.bar = None
        self.tasks = {}
        if progress is True:
            from rich.console import Console
            from rich.progress import Progress

            err = Console(stderr=True)
            if err.is_terminal:
                self.bar = Progress(console=err, transient=True)
                self.bar.start()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.cb is not None:
            self.cb(stage, done, total)
        if self.bar is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(stage, total=total)
            self.bar.update(self.tasks[stage], completed=done, total=total)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def _batches(data: Sequence, batch_size: int, collate, start_block: int = 0):
    """Fixed block boundaries [b*B, (b+1)*B): a resumed build sees exactly the same batches."""
    n = len(data)
    for b in range(start_block, math.ceil(n / batch_size)):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        yield b, lo, collate([data[i] for i in range(lo, hi)])


def _norm_hessian(hessian: str) -> str:
    h = HESSIANS.get(str(hessian).lower())
    if h is None:
        raise AttributionError(f"unknown hessian {hessian!r}; use 'eFIM' or 'identity'")
    return h


def _damping_key(damping) -> Any:
    return None if damping is None else str(damping)


# ------------------------------------------------------------------------------- build

def build_index(model: torch.nn.Module, train_data: Sequence, loss_fn: Callable, out,
                sparsification: str = "random_mask-128*128", projection: str = "sjlt-4096",
                hessian: str = "eFIM", damping=None, batch_size: int = 32, seed: int = 0,
                layers: list[str] | str | None = None, collate: Callable | None = None,
                index: str = "flat", task: str | None = None, progress=True, device=None,
                nlist: int | None = None, nprobe: int | None = None,
                selective_mask=None) -> "AttributionIndex":
    """Sketch every training example (pass 1, resumable), precondition (pass 2), index.

    ``selective_mask`` is a file from `grass-index selective-mask fit`, needed by
    ``selective_mask-…`` specs; it is copied into ``out`` so queries need only the directory.

    Re-running with the same ``out`` resumes an interrupted build; with another ``damping``,
    ``hessian`` or ``index`` it re-preconditions from the stored sketches (no gradients).
    """
    out = Path(out)
    hessian = _norm_hessian(hessian)
    if index not in INDEX_KINDS:
        raise AttributionError(f"unknown index kind {index!r}; use 'flat' (exact) or 'ivf'")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AttributionError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        parse_damping(damping)
    except ValueError as e:
        raise AttributionError(f"bad damping {damping!r}: {e}") from e
    if not (hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__")):
        raise AttributionError("train_data must be an indexable sequence (len() and [i])")
    n = len(train_data)
    if n == 0:
        raise AttributionError("train_data is empty; nothing to index")
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    collate = collate or default_collate
    model.eval()

    # Everything that can be checked without writing is checked first.
    check_loss(model, train_data, loss_fn, collate, where="loss_fn")
    infos = select_layers(model, layers)
    masks = load_selective_mask(selective_mask) if selective_mask is not None else None
    sketcher = GradientSketcher(model, infos, sparsification=sparsification,
                                projection=projection, seed=seed, clamp=True, device=device,
                                selective_masks=masks)
    describe = _jsonable(sketcher.describe())
    for name, d in describe.items():
        note = d.get("clamp_note") or d.get("clamped") or d.get("notes")
        if note:
            log.info("layer %s: %s", name, note)

    build = dict(format=FORMAT_VERSION, sparsification=sparsification, projection=projection,
                 seed=seed, layers=layers, layer_dims=_layer_dims(infos),
                 layout=sketcher.layout, dim=sketcher.dim, batch_size=batch_size, n_train=n,
                 model_hash=model_hash(model, infos), data_hash=data_hash(train_data),
                 sketch_fingerprint=sketcher.fingerprint())
    if masks is not None:  # only recorded when used, so other builds' hashes are unchanged
        build["selective_mask"] = _hash(masks)
    _claim_out_dir(out, build)
    if masks is not None:
        _atomic_write(out / MASK_FILE, Path(selective_mask).read_bytes())

    prog = _Progress(progress)
    try:
        store = SketchStore.create(out / STORE_DIR, dim=sketcher.dim, meta=_jsonable(build))
        with store:
            n_blocks = math.ceil(n / batch_size)
            start = store.committed_blocks
            if start:
                log.info("resuming: %d of %d batches already sketched", start, n_blocks)
            prog("sketch", start, n_blocks)
            for b, lo, batch in _batches(train_data, batch_size, collate, start):
                try:
                    rows = sketcher.sketch(batch, loss_fn)
                except CaptureError as e:
                    if e.example is not None:
                        raise AttributionError(
                            f"training example {lo + e.example} (train id; batch {b}): {e}") from e
                    raise
                store.put_block(b, lo, rows.numpy())
                prog("sketch", b + 1, n_blocks)
            cfg = _finish(out, store, build, describe, hessian=hessian, damping=damping,
                          index=index, nlist=nlist, nprobe=nprobe, task=task, progress=prog,
                          data=train_data)
    finally:
        prog.close()
    return AttributionIndex(out, cfg)


def _claim_out_dir(out: Path, build: dict) -> None:
    """Refuse a directory holding something else; record what this build's sketches mean."""
    bfile = out / BUILD_FILE
    if out.exists() and not out.is_dir():
        raise AttributionError(f"--out {out} is a file; pass a directory")
    if bfile.is_file():
        try:
            old = json.loads(bfile.read_text())
        except ValueError as e:
            raise AttributionError(f"{bfile} is corrupted ({e}); delete {out} and rebuild") from e
        if _jsonable(old) != _jsonable(build):
            diff = sorted(k for k in set(old) | set(build)
                          if _jsonable(old.get(k)) != _jsonable(build.get(k)))
            if len(diff) > 1 and "sketch_fingerprint" in diff:  # derived: name the cause only
                diff.remove("sketch_fingerprint")
            hint = ""
            if "model_hash" in diff:
                hint = " (the model's weights differ)"
            elif "data_hash" in diff or "n_train" in diff:
                hint = " (the training data differs)"
            raise AttributionError(
                f"output directory {out} holds a different build (differs in: {', '.join(diff)})"
                f"{hint}; choose another --out or delete {out} to rebuild")
        return
    if out.is_dir() and any(p.name not in _OUR_FILES and not p.name.startswith(".")
                            for p in out.iterdir()):
        raise AttributionError(f"output directory {out} is not empty and is not a grass-index "
                               "build; choose a new or empty directory")
    if (out / STORE_DIR).exists():
        raise AttributionError(f"{out} has sketches but no {BUILD_FILE}; it is corrupted: delete "
                               "it and rebuild")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(bfile, build)


def _finish(out: Path, store, build: dict, describe: dict, *, hessian: str, damping,
            index: str, nlist, nprobe, task, progress, data=None, old_config=None) -> dict:
    """Pass 2: Fisher from stored sketches -> preconditioner -> FAISS -> config.json."""
    n, layout = build["n_train"], build["layout"]
    n_blocks = math.ceil(n / build["batch_size"])
    if store.committed_blocks < n_blocks:
        raise AttributionError(f"only {store.committed_blocks} of {n_blocks} batches are "
                               "sketched; re-run the build to finish pass 1")
    key = _hash(dict(hessian=hessian, damping=_damping_key(damping), index=index, nlist=nlist,
                     nprobe=nprobe, sketch=_hash(build)))[:12]
    pre = _stored_preconditioner(store, key, layout)  # a resumed pass 2 reuses the inverses
    if pre is None:
        fisher = _fisher(store, layout, n_blocks, progress) if hessian == "eFIM" else {}
        pre = Preconditioner.fit(fisher, layout, hessian=hessian, damping=damping)
        store.put_array(f"precond/{key}", _state_to_array(pre.state_dict()))

    vindex = _build_faiss(store, pre, build, index, nlist, nprobe, progress, n_blocks)
    index_file = f"index-{key}.faiss"
    # Temp files of a writer killed mid-save (an index can be GBs). We hold the store's writer
    # lock, so no live process is writing any of them.
    for p in [*out.glob("index-*.faiss.tmp-*"), *out.glob(f".{CONFIG_FILE}.tmp*")]:
        p.unlink(missing_ok=True)
    vindex.save(out / index_file)

    cfg = dict(build)
    cfg.update(
        library="grass-index", version=__version__, torch=torch.__version__,
        task=task if task is not None else (old_config or {}).get("task"),
        hessian=hessian, damping=_damping_key(damping), damping_used=pre.damping_used,
        preconditioner=_jsonable(pre.describe()), preconditioner_key=key,
        layers_described=describe, index=_jsonable(vindex.describe()), index_kind=index,
        index_file=index_file, n_blocks=n_blocks, sketch_hash=_hash(build),
        item_signature=(_data_signature(data) if data is not None
                        else (old_config or {}).get("item_signature")),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    cfg = _jsonable(cfg)
    cfg["config_hash"] = config_hash(cfg)
    store.put_meta("config", cfg)
    _write_json(out / CONFIG_FILE, cfg)  # the commit point of the whole build
    for p in out.glob("index-*.faiss"):  # older preconditioning variants
        if p.name != index_file:
            p.unlink(missing_ok=True)
    for name in store.array_names():  # their preconditioners (k×k float64 per layer)
        if name.startswith("precond/") and name != f"precond/{key}":
            store.delete_array(name)
    progress("done", 1, 1)
    return cfg


def _stored_preconditioner(store, key: str, layout: dict):
    """The preconditioner pass 2 already stored under ``key``, or None when there is none or it
    is damaged (non-finite, unreadable): then it is fitted again from the cached Fisher."""
    name = f"precond/{key}"
    if not store.has_array(name):
        return None
    try:
        state = _state_from_array(store.get_array(name))
        pre = Preconditioner.from_state_dict(state, layout)
    except (StoreError, ValueError) as e:
        log.warning("stored preconditioner %s is unreadable (%s); refitting it", name, e)
        return None
    if not all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f"):
        log.warning("stored preconditioner %s has NaN/inf entries; refitting it", name)
        return None
    return pre


def config_hash(cfg: dict) -> str:
    return _hash({k: v for k, v in cfg.items() if k not in ("config_hash", "created")})


def _fisher(store, layout, n_blocks, progress) -> dict:
    """F_l from the stored sketches, cached in the store (float64, deterministic order)."""
    if store.get_meta("fisher_done", False) and all(store.has_array(f"fisher/{k}") for k in layout):
        return {k: np.asarray(store.get_array(f"fisher/{k}"), dtype=np.float64) for k in layout}
    acc = FisherAccumulator(layout)
    done = 0
    for _, rows in _chunks(store):
        acc.update(np.asarray(rows, dtype=np.float32))
        done += len(rows)
        progress("fisher", done, store.num_rows)
    fisher = {k: acc.fisher(k) for k in layout}
    for k, f in fisher.items():
        store.put_array(f"fisher/{k}", np.asarray(f, dtype=np.float64))
    store.put_meta("fisher_n", int(acc.n))
    store.put_meta("fisher_done", True)
    return fisher


def _state_to_array(state: dict) -> np.ndarray:
    """A preconditioner state (dict of arrays, some of them strings) as one uint8 array (.npz)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def _state_from_array(arr) -> dict:
    with np.load(io.BytesIO(np.asarray(arr, dtype=np.uint8).tobytes()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _chunks(store, rows_per_chunk: int = 2048):
    """Stored blocks regrouped into ~2k-row chunks (id order): big matmuls instead of many small."""
    buf, start, n = [], 0, 0
    for s, rows in store.iter_blocks():
        if not buf:
            start = s
        buf.append(rows)
        n += len(rows)
        if n >= rows_per_chunk:
            yield start, np.concatenate(buf)
            buf, n = [], 0
    if buf:
        yield start, np.concatenate(buf)


def _preconditioned_blocks(store, pre):
    for start, rows in _chunks(store):
        vec = np.asarray(pre.apply(np.asarray(rows, dtype=np.float32)), dtype=np.float32)
        yield start, np.ascontiguousarray(vec)


def _build_faiss(store, pre, build, kind, nlist, nprobe, progress, n_blocks):
    vindex = VectorIndex.create(build["dim"], kind, nlist=nlist, nprobe=nprobe)
    if kind == "ivf":  # train on (a deterministic sample of) the preconditioned vectors
        cap, sample, got = 100_000, [], 0
        for _, vec in _preconditioned_blocks(store, pre):
            sample.append(vec)
            got += len(vec)
            if got >= cap:
                break
        vindex.train(np.concatenate(sample)[:cap])
    for start, vec in _preconditioned_blocks(store, pre):
        vindex.add(vec, np.arange(start, start + len(vec), dtype=np.int64))
        progress("index", start + len(vec), build["n_train"])
    if vindex.ntotal != build["n_train"]:
        raise AttributionError(f"index holds {vindex.ntotal} vectors for {build['n_train']} "
                               "training examples; the sketch store is inconsistent — run "
                               "grass-index verify")
    return vindex


# ------------------------------------------------------------------------------- open

def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise AttributionError(f"index directory {path} not found; build one with "
                               "`grass-index build TASK --out DIR`")
    cfile = path / CONFIG_FILE
    if not cfile.is_file():
        progress = ""
        try:
            b = json.loads((path / BUILD_FILE).read_text())
            with SketchStore.open(path / STORE_DIR, readonly=True) as st:
                done = st.committed_blocks
            progress = f" ({done} of {math.ceil(b['n_train'] / b['batch_size'])} batches sketched)"
        except Exception:
            pass
        if (path / BUILD_FILE).is_file():
            raise AttributionError(f"the build in {path} is not finished{progress}; re-run the same "
                                   "build command to resume it")
        raise AttributionError(f"{path} is not a grass-index index (no {CONFIG_FILE}); pass the "
                               "--out directory of `grass-index build`")
    try:
        cfg = json.loads(cfile.read_text())
    except ValueError as e:
        raise AttributionError(f"{cfile} is corrupted ({e}); run `grass-index verify {path} "
                               "--repair` or rebuild") from e
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
                               f"run `grass-index verify {path} --repair` or rebuild")
    return cfg


def open_index(path, *, mmap: bool = False) -> "AttributionIndex":
    """Open a finished index directory (read-only) for query/score/info."""
    path = Path(path)
    return AttributionIndex(path, _read_config(path), mmap=mmap)


class AttributionIndex:
    """A built index: ``query`` (top-k proponents/opponents) and ``score`` (full matrix)."""

    def __init__(self, path, config: dict, *, mmap: bool = False):
        self.path = Path(path)
        self.config = config
        self._mmap = mmap
        self._vindex = None
        self._pre = None

    # -- properties -------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return int(self.config["n_train"])

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    @property
    def layout(self) -> dict:
        return dict(self.config["layout"])

    @property
    def task(self) -> str | None:
        return self.config.get("task")

    def info(self) -> dict:
        return dict(self.config)

    def __repr__(self) -> str:
        return (f"AttributionIndex({str(self.path)!r}, n_train={self.n_train}, dim={self.dim}, "
                f"hessian={self.config['hessian']})")

    # -- lazily opened parts ------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self):
        """The sketch store, opened only for the duration of one operation (so a writer in this
        process, e.g. reprecondition on another handle, is never blocked by an idle reader)."""
        try:
            store = SketchStore.open(self.path / STORE_DIR, readonly=True)
        except StoreError as e:
            raise AttributionError(f"cannot open the sketch store of {self.path}: {e}") from e
        try:
            yield store
        finally:
            store.close()

    @property
    def vindex(self):
        if self._vindex is None:
            f = self.path / self.config["index_file"]
            if not f.is_file():
                raise AttributionError(f"{f} is missing; run `grass-index verify {self.path} "
                                       "--repair` to rebuild it from the stored sketches")
            try:
                self._vindex = VectorIndex.load(f, mmap=self._mmap)
            except Exception as e:
                raise AttributionError(f"{f} is unreadable ({e}); run `grass-index verify "
                                       f"{self.path} --repair` to rebuild it") from e
            if self._vindex.ntotal != self.n_train:
                raise AttributionError(f"{f} holds {self._vindex.ntotal} vectors, config says "
                                       f"{self.n_train}; run `grass-index verify {self.path} "
                                       "--repair`")
        return self._vindex

    @property
    def preconditioner(self):
        if self._pre is None:
            name = f"precond/{self.config['preconditioner_key']}"
            with self._reading() as store:
                if not store.has_array(name):
                    raise AttributionError(f"the preconditioner is missing from {self.path}; run "
                                           f"`grass-index verify {self.path} --repair`")
                state = _state_from_array(store.get_array(name))
            self._pre = Preconditioner.from_state_dict(state, self.layout)
        return self._pre

    def close(self) -> None:
        self._vindex = self._pre = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- query side ----------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module):
        """The model must have the layers (names and shapes) the index was built on."""
        try:
            infos = select_layers(model, self.config.get("layers"))
        except CaptureError as e:
            raise AttributionError(f"the model does not fit index {self.path}: {e}") from e
        got = {d["name"]: d for d in _layer_dims(infos)}
        want = {d["name"]: d for d in self.config["layer_dims"]}
        for name, w in want.items():
            g = got.get(name)
            if g is None:
                raise AttributionError(f"the model has no layer {name!r}, which index {self.path} "
                                       "was built on; query with the model the index was built "
                                       "from")
            if g != w:
                dims = lambda d: (f"{d['kind']} d_in={d['d_in']} d_out={d['d_out']} "  # noqa: E731
                                  f"bias={d['has_bias']} numel={d['numel']}")
                raise AttributionError(f"layer {name!r} of the model is {dims(g)} but index "
                                       f"{self.path} was built with {dims(w)}; query with the model "
                                       "the index was built from")
        extra = sorted(set(got) - set(want))
        if extra:
            raise AttributionError(f"the model has layers {extra} that index {self.path} does not "
                                   "have; query with the model the index was built from")
        if model_hash(model, infos) != self.config.get("model_hash"):
            log.warning("the model's weights differ from the ones index %s was built with; "
                        "scores mix two models", self.path)
        return infos

    def _sketcher(self, model, device=None):
        infos = self.check_model(model)
        masks = (load_selective_mask(self.path / MASK_FILE)
                 if self.config.get("selective_mask") else None)
        sk = GradientSketcher(model, infos, sparsification=self.config["sparsification"],
                              projection=self.config["projection"], seed=self.config["seed"],
                              clamp=True, device=device, selective_masks=masks)
        if {k: int(v) for k, v in sk.layout.items()} != self.layout:
            raise AttributionError(f"this grass-index builds sketches of layout {sk.layout} for "
                                   f"config {self.config['sparsification']}/"
                                   f"{self.config['projection']}, but the index has {self.layout}; "
                                   "rebuild the index with this version")
        built_with = self.config.get("sketch_fingerprint")
        if built_with is not None and sk.fingerprint() != built_with:
            raise AttributionError(
                f"the projections drawn now for {self.config['sparsification']}/"
                f"{self.config['projection']} (seed {self.config['seed']}) differ from the ones "
                f"the index was built with (fingerprint {sk.fingerprint()} vs {built_with}): "
                "queries would be sketched differently from the training examples. Rebuild the "
                "index with this grass-index version, or query with the version that built it")
        return sk

    def query_sketches(self, model, examples: Sequence, loss_fn, *, collate=None,
                       batch_size: int | None = None, device=None) -> torch.Tensor:
        """Raw sketches g(z) [n, K] of the query examples (not preconditioned)."""
        if not (hasattr(examples, "__len__") and hasattr(examples, "__getitem__")):
            raise AttributionError("examples must be an indexable sequence of items like "
                                   "train_data[i]")
        if len(examples) == 0:
            return torch.zeros(0, self.dim)
        want = self.config.get("item_signature")
        if want is not None:
            for i in range(len(examples)):
                msg = signature_mismatch(want, item_signature(examples[i]), f"query example {i}")
                if msg:
                    raise AttributionError(f"{msg}; query examples must look like the training "
                                           "examples")
        model.eval()
        sk = self._sketcher(model, device)
        collate = collate or default_collate
        out = []
        for b, lo, batch in _batches(examples, batch_size or self.config["batch_size"], collate):
            try:
                out.append(sk.sketch(batch, loss_fn))
            except CaptureError as e:
                if e.example is not None:
                    raise AttributionError(f"query example {lo + e.example}: {e}") from e
                raise AttributionError(f"query examples: {e}") from e
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                raise AttributionError(f"the loss failed on query examples {lo}..."
                                       f"{lo + _len(batch) - 1} ({type(e).__name__}: {e}); are "
                                       "they shaped and typed like the training examples?") from e
        return torch.cat(out)

    def query(self, model, examples: Sequence, loss_fn, k: int = 10, opponents: bool = False,
              *, collate=None, batch_size=None, device=None) -> list[list[tuple[int, float]]]:
        """Per example, the k training examples with the largest (or, with opponents=True,
        the most negative) influence score, as (train_id, score) pairs, best first."""
        if not isinstance(k, int) or k < 1:
            raise AttributionError(f"k must be a positive integer, got {k!r}")
        q = self.query_sketches(model, examples, loss_fn, collate=collate,
                                batch_size=batch_size, device=device)
        return self.search(q, k, opponents=opponents)

    def search(self, q: torch.Tensor, k: int = 10, opponents: bool = False):
        """Top-k search with ready-made raw query sketches [n, K]."""
        if q.shape[0] == 0:
            return []
        k = min(k, self.n_train)
        scores, ids = self.vindex.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k,
                                         opponents=opponents)
        scores, ids = np.asarray(scores), np.asarray(ids)
        return [[(int(i), float(s)) for i, s in zip(ids[r], scores[r]) if i >= 0]
                for r in range(len(ids))]

    def train_vectors(self):
        """Yield (start_id, preconditioned rows) from the stored sketches, in id order."""
        pre = self.preconditioner
        with self._reading() as store:
            yield from _preconditioned_blocks(store, pre)

    def score(self, model, examples: Sequence, loss_fn, *, collate=None, batch_size=None,
              device=None) -> torch.Tensor:
        """Exact scores [n_examples, n_train]: g(z)^T (F + lambda I)^-1 g(z_i)."""
        q = self.query_sketches(model, examples, loss_fn, collate=collate,
                                batch_size=batch_size, device=device)
        return self.score_sketches(q)

    def score_sketches(self, q: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape[0], self.n_train, dtype=torch.float32)
        for start, vec in self.train_vectors():
            out[:, start:start + len(vec)] = q @ torch.from_numpy(vec).T
        return out

    # -- maintenance --------------------------------------------------------------------
    def reprecondition(self, damping=None, hessian: str | None = None, index: str | None = None,
                       progress=False) -> "AttributionIndex":
        """Refit the preconditioner (and FAISS) from the stored sketches; no gradients."""
        hessian = _norm_hessian(hessian or self.config["hessian"])
        index = index or self.config.get("index_kind", "flat")
        try:
            parse_damping(damping)
        except ValueError as e:
            raise AttributionError(f"bad damping {damping!r}: {e}") from e
        self.close()
        build = json.loads((self.path / BUILD_FILE).read_text())
        prog = _Progress(progress)
        try:
            with SketchStore.open(self.path / STORE_DIR, readonly=False) as store:
                cfg = _finish(self.path, store, build, self.config.get("layers_described", {}),
                              hessian=hessian, damping=damping, index=index, nlist=None,
                              nprobe=None, task=None, progress=prog, old_config=self.config)
        finally:
            prog.close()
        self.config = cfg
        return self


def _len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch:
        return _len(batch[0])
    if isinstance(batch, dict) and batch:
        return _len(next(iter(batch.values())))
    return 1


# ------------------------------------------------------------------------------- verify

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
        cfg = _read_config(path)
        check("config", True, f"config.json readable, hash {cfg['config_hash']} matches")
    except AttributionError as e:
        check("config", False, e)
        return report()
    check("version", cfg.get("format") == FORMAT_VERSION,
          f"built by grass-index {cfg.get('version')} (format {cfg.get('format')}); "
          f"this is {__version__} (format {FORMAT_VERSION})")
    try:
        build = json.loads((path / BUILD_FILE).read_text())
        check("build record", _hash(build) == cfg.get("sketch_hash"),
              "build.json matches config" if _hash(build) == cfg.get("sketch_hash")
              else "build.json does not match config.json")
    except (OSError, ValueError) as e:
        check("build record", False, f"{BUILD_FILE}: {e}")
        return report()

    n, bs = int(cfg["n_train"]), int(cfg["batch_size"])
    try:
        store = SketchStore.open(path / STORE_DIR, readonly=True)
    except Exception as e:
        check("sketch store", False, f"cannot open: {e}; the sketches are lost: rebuild")
        return report()
    pre = None
    try:
        meta_ok = _jsonable(store.get_meta("config", None)) == cfg
        check("store config", meta_ok, "LMDB config equals config.json" if meta_ok
              else "LMDB config differs from config.json")
        seen = np.zeros(n, dtype=np.int32)
        bad_rows, bad_shape, count = 0, 0, 0
        try:
            for start, rows in store.iter_blocks():
                rows = np.asarray(rows)
                if rows.ndim != 2 or rows.shape[1] != cfg["dim"] or start + len(rows) > n:
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
            check("counts", store.num_rows == n and store.committed_blocks == math.ceil(n / bs),
                  f"{store.num_rows} rows in {store.committed_blocks} blocks; expected {n} rows in "
                  f"{math.ceil(n / bs)} blocks")
            check("every id has a sketch", missing == 0 and dup == 0 and bad_shape == 0,
                  f"{missing} missing, {dup} duplicated, {bad_shape} malformed blocks")
            check("sketches finite", bad_rows == 0, f"{bad_rows} rows with NaN/inf")
        name = f"precond/{cfg['preconditioner_key']}"
        try:
            pre = Preconditioner.from_state_dict(_state_from_array(store.get_array(name)),
                                                 cfg["layout"])
            finite = all(bool(np.isfinite(v).all()) for v in pre.state_dict().values()
                         if np.asarray(v).dtype.kind == "f")
            check("preconditioner", finite, "finite" if finite else "contains NaN/inf")
            if not finite:
                pre = None
        except Exception as e:
            check("preconditioner", False, f"missing or unreadable ({e})")

        ifile = path / cfg["index_file"]
        faiss_ok, detail = False, ""
        try:
            vindex = VectorIndex.load(ifile)
            if vindex.ntotal != n:
                detail = f"FAISS holds {vindex.ntotal} vectors, expected {n}"
            elif pre is not None:
                rng = np.random.default_rng(seed)
                ids = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, min(sample, n))]))
                want = np.asarray(pre.apply(np.asarray(store.get_rows(ids), dtype=np.float32)))
                got = np.asarray(vindex.reconstruct(ids.astype(np.int64)))
                err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
                faiss_ok = err < 1e-4
                detail = (f"{len(ids)} sampled ids agree with LMDB (max rel err {err:.1e})"
                          if faiss_ok else f"FAISS vectors differ from LMDB (rel err {err:.1e})")
            else:
                faiss_ok, detail = True, f"{n} vectors (not compared: no preconditioner)"
        except Exception as e:
            detail = f"{ifile.name} missing or unreadable ({type(e).__name__}: {e})"
        check("faiss vs lmdb", faiss_ok, detail)
    finally:
        store.close()

    if repair and not all(c["ok"] for c in checks):
        fixable = {"faiss vs lmdb", "preconditioner", "store config"}
        broken = {c["name"] for c in checks if not c["ok"]}
        if broken <= fixable:
            idx = AttributionIndex(path, cfg)
            idx.reprecondition(damping=_parse_saved_damping(cfg.get("damping")),
                               hessian=cfg["hessian"], index=cfg.get("index_kind", "flat"))
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


# ------------------------------------------------------------------------------- status

def describe_index(path) -> dict:
    """What `info` shows: the config of a finished index, or the progress of a running /
    interrupted build (readable from another process while the build writes)."""
    path = Path(path)
    cfile = path / CONFIG_FILE
    if cfile.is_file():
        cfg = _read_config(path)
        return dict(complete=True, path=str(path), config=cfg)
    bfile = path / BUILD_FILE
    if not bfile.is_file():
        _read_config(path)  # raises the right message
    try:
        build = json.loads(bfile.read_text())
    except ValueError as e:
        raise AttributionError(f"{bfile} is corrupted ({e}); delete {path} and rebuild") from e
    n_blocks = math.ceil(build["n_train"] / build["batch_size"])
    done = 0
    try:
        with SketchStore.open(path / STORE_DIR, readonly=True) as st:
            done = st.committed_blocks
    except Exception:
        pass
    return dict(complete=False, path=str(path), build=build, committed_blocks=done,
                n_blocks=n_blocks)
