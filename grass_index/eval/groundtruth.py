"""Ground truth for the LDS: retrain on random subsets, record each query example's loss.

Training comes from the task. A task file may define (optional; needed only for ``eval``)::

    def train(train_data_subset: Sequence, seed: int) -> torch.nn.Module
        # Train a fresh model, from scratch, on exactly these examples (a torch Subset of
        # train_data(), items in train-id order; ``.indices`` holds their train ids),
        # with the same recipe as model(). `seed` fixes init/shuffling so reruns agree.

Every subset is trained with every seed and the losses are averaged over seeds. The same
seeds are used for every subset (common random numbers): the differences between subsets
then come from the data, not from unrelated initialisations, which lowers the noise of the
ground truth at no cost.

Cache layout (one directory; every file is written to a temp name and renamed, so a crash
never leaves half a file, and a rerun skips every (subset, seed) already on disk)::

    meta.json                  n_train, n_query, m, seeds, tag, content — checked on resume
    subsets.npy                bool [m, n_train] membership
    runs/s00007_seed1.npz      losses [n_query] of the model for subset 7, seed 1 (+ seconds)

A cache is keyed by content, not by the task's path: ``content`` fingerprints every training
and query example and holds what the caller adds (``depends_on``: the task file's sha256, whose
train() and loss made the losses, and the retraining settings). Editing train(), the loss or the
data and re-running reuses nothing: the cache refuses, naming what changed.
"""
from __future__ import annotations


import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import option, spelled
from ..fileio import atomic_save
from .errors import EvalError
from .subsets import as_masks, subset_indices

CACHE_VERSION = 2  # 2: meta.json holds ``content`` (version 1 caches are keyed by path only)


@dataclass
class GroundTruth:
    """Retrained-model losses. ``losses`` is the seed average, shape [m, n_query]."""

    subsets: np.ndarray            # bool [m, n_train]
    losses_per_seed: np.ndarray    # [m, n_seeds, n_query]
    seeds: list[int]
    seconds: np.ndarray            # [m, n_seeds] training+eval wall time of each model
    meta: dict = field(default_factory=dict)

    @property
    def losses(self) -> np.ndarray:
        return self.losses_per_seed.mean(axis=1)


def _write_json(path: Path, obj) -> None:
    atomic_save(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _run_path(cache: Path, j: int, seed: int) -> Path:
    return cache / "runs" / f"s{j:05d}_seed{seed}.npz"


# -- cache checks -----------------------------------------------------------------------

def data_fingerprint(data: Sequence) -> str:
    """sha256 over every example's fingerprint (its tensors' bytes, dtypes and shapes)."""
    from ..indexdir.fingerprints import example_digest

    h = hashlib.sha256(str(len(data)).encode())
    for i in range(len(data)):
        h.update(example_digest(data[i]))
    return h.hexdigest()[:16]


def content_record(train_data: Sequence, query_data: Sequence, depends_on: dict | None) -> dict:
    """What the cached losses were computed from: both data sets' fingerprints and
    ``depends_on`` (e.g. the task file's sha256 and the retraining settings)."""
    return {"train_data": data_fingerprint(train_data), "query_data": data_fingerprint(query_data),
            **{str(k): v for k, v in (depends_on or {}).items()}}


def content_key(content: dict) -> str:
    """A short name for a content record (default cache directories carry it)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()
                          ).hexdigest()[:10]


def _check_content(cache: Path, old: dict | None, new: dict) -> None:
    if old == new:
        return
    changed = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
    raise EvalError(f"ground-truth cache {cache} was trained from other content than this run "
                    f"(changed: {', '.join(changed)}): its losses belong to other models or "
                    f"data; delete it or use another {option('ground_truth')} directory (the "
                    f"default directory is per content, so leaving {option('ground_truth')} out "
                    "trains afresh)")


def _prepare_cache(cache: Path, masks: np.ndarray, seeds: list[int], n_query: int,
                   tag: str | None, content: dict) -> dict:
    """Create the cache, or check an existing one was made for the same experiment and the
    same content."""
    (cache / "runs").mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "n_train": int(masks.shape[1]), "n_query": int(n_query),
            "m": int(masks.shape[0]), "seeds": [int(s) for s in seeds], "tag": tag,
            "content": content}
    mpath, spath = cache / "meta.json", cache / "subsets.npy"
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        if old.get("version") == CACHE_VERSION:
            _check_content(cache, old.get("content"), content)
        for key in ("version", "n_train", "n_query", "m", "tag"):
            if old.get(key) != meta[key]:
                raise EvalError(
                    f"ground-truth cache {cache} was made with {key}={old.get(key)!r}, this run has "
                    f"{key}={meta[key]!r}; use another {option('ground_truth')} directory or "
                    "delete this one")
        if not spath.is_file() or not np.array_equal(np.load(spath), masks):
            raise EvalError(f"ground-truth cache {cache} holds different subsets; use another "
                             "directory, or the same m/alpha/subset seed as when it was made")
        # new seeds may be added to an existing cache; keep the union in meta
        meta["seeds"] = sorted(set(old.get("seeds", [])) | set(meta["seeds"]))
    else:
        atomic_save(spath, lambda f: np.save(f, masks))
    _write_json(mpath, meta)
    return meta


def _query_losses(model, query_data, loss_fn, collate, batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(query_data), batch_size):
            items = [query_data[i] for i in range(start, min(start + batch_size, len(query_data)))]
            out.append(torch.as_tensor(loss_fn(model, collate(items))).detach().double().cpu().reshape(-1))
    losses = torch.cat(out).numpy()
    if losses.shape[0] != len(query_data):
        raise EvalError(f"loss_fn returned {losses.shape[0]} losses for {len(query_data)} query "
                         "examples; it must return one loss per example (reduction='none')")
    return losses


# -- the public functions ---------------------------------------------------------------

def train_ground_truth(train_fn: Callable[[Sequence, int], torch.nn.Module], train_data: Sequence,
                       query_data: Sequence, loss_fn: Callable, subsets, seeds: Sequence[int],
                       cache_dir: str | os.PathLike, progress: bool = True, *,
                       collate: Callable | None = None, batch_size: int = 256,
                       tag: str | None = None, depends_on: dict | None = None) -> GroundTruth:
    """Train one model per (subset, seed) with `train_fn`, record query losses, cache them.

    Resumable: (subset, seed) pairs already in `cache_dir` are not retrained. `tag` (e.g. the
    task reference) is stored and must match on resume, so two tasks never share a cache; so
    must the content (every example of both data sets, and ``depends_on``: e.g. the sha256 of
    the file defining train_fn and loss_fn), so edited code or data never reuses old losses.
    """
    from torch.utils.data import Subset

    if not callable(train_fn):
        raise EvalError("train_ground_truth: train_fn must be callable as train(subset, seed) -> "
                         "nn.Module; define train() in the task file (see grass_index.eval)")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise EvalError(f"train_ground_truth: seeds={seeds}; give at least one, without repeats")
    masks = as_masks(subsets, len(train_data))
    if collate is None:
        from ..task import default_collate as collate
    cache = Path(cache_dir)
    _prepare_cache(cache, masks, seeds, len(query_data), tag,
                   content_record(train_data, query_data, depends_on))

    todo = [(j, s) for j in range(masks.shape[0]) for s in seeds if not _run_path(cache, j, s).is_file()]
    from ..pipeline.progress import Progress

    total = masks.shape[0] * len(seeds)
    bar = Progress(bool(progress) if not callable(progress) else progress)
    bar("ground truth", total - len(todo), total)
    try:
        for step, (j, s) in enumerate(todo, 1):
            t0 = time.perf_counter()
            model = train_fn(Subset(train_data, subset_indices(masks[j])), s)
            if not isinstance(model, torch.nn.Module):
                raise EvalError(f"train(subset, seed) returned {type(model).__name__}; it must "
                                 "return the trained torch.nn.Module")
            model.eval()
            losses = _query_losses(model, query_data, loss_fn, collate, batch_size)
            if not np.isfinite(losses).all():
                raise EvalError(f"the model trained on subset {j} with seed {s} has NaN/inf loss on "
                                 f"{int((~np.isfinite(losses)).sum())} query examples; make train() "
                                 "stable (lower learning rate) before computing LDS")
            secs = time.perf_counter() - t0
            atomic_save(_run_path(cache, j, s),
                        lambda f: np.savez(f, losses=losses, seconds=np.float64(secs)))
            bar("ground truth", total - len(todo) + step, total)
    finally:
        bar.close()
    return load_ground_truth(cache, seeds=seeds)


def load_ground_truth(cache_dir: str | os.PathLike, seeds: Sequence[int] | None = None) -> GroundTruth:
    """Read a complete ground-truth cache (all subsets × `seeds`, default all seeds in meta)."""
    cache = Path(cache_dir)
    mpath = cache / "meta.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"no ground truth in {cache} (meta.json missing); create it with "
                                + spelled("train_ground_truth(...) or `grass-index eval`",
                                          "train_ground_truth(...) or run_eval(...)"))
    meta = json.loads(mpath.read_text())
    masks = np.load(cache / "subsets.npy")
    seeds = [int(s) for s in (meta["seeds"] if seeds is None else seeds)]
    losses = np.empty((masks.shape[0], len(seeds), meta["n_query"]))
    seconds = np.empty((masks.shape[0], len(seeds)))
    missing = []
    for j in range(masks.shape[0]):
        for k, s in enumerate(seeds):
            p = _run_path(cache, j, s)
            if not p.is_file():
                missing.append((j, s))
                continue
            with np.load(p) as z:
                losses[j, k], seconds[j, k] = z["losses"], float(z["seconds"])
    if missing:
        raise EvalError(f"ground truth in {cache} is incomplete: {len(missing)} of "
                         f"{masks.shape[0] * len(seeds)} models missing (first: subset {missing[0][0]}, "
                         f"seed {missing[0][1]}); rerun "
                         + spelled("train_ground_truth / `grass-index eval`",
                                   "train_ground_truth / run_eval")
                         + " to finish it (finished models are kept)")
    return GroundTruth(subsets=masks, losses_per_seed=losses, seeds=seeds, seconds=seconds, meta=meta)
