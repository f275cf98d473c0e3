"""What the server keeps hot: the index, the task, its model and data, loaded once at start.

``Engine.run`` answers a batch of query jobs with one sketching call and one search per
direction (the micro-batcher hands it whatever arrived together); everything else here
turns ids and items into the JSON shapes of ``grass-index query --json``.
"""
from __future__ import annotations

import base64
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import grass_index as gi
from grass_index.errors import GrassIndexError, repair_command, spelled
from grass_index.task import Task, TaskError, task_for_index

log = logging.getLogger("grass_index.serve")

IMAGE_PX = 64  # inline thumbnails: the task's image scaled (nearest neighbour) to this size


class ServeError(GrassIndexError, ValueError):
    """The server cannot start (bad bind, unusable index or task); the message says the fix."""


def resolve_task(idx, task: str | None) -> Task:
    """The task whose code the server runs: the one named on the command line (the index's
    recorded task only when it ships with grass-index: an index directory is data). The ONLY
    place serve decides what code to import."""
    try:
        t, note = task_for_index(task, recorded=idx.task, sha256=idx.config.get("task_sha256"),
                                 index_dir=idx.path, command="serve")
    except TaskError as e:
        raise ServeError(str(e)) from e
    if note:
        log.warning("%s", note)
    return t


def verify_or_refuse(path: Path, sample: int = 8) -> None:
    """Refuse a corrupted index with verify's own findings (a small sample of rows is compared
    with FAISS, so this costs seconds, not a full check)."""
    rep = gi.verify_index(path, sample=sample, fast=True)
    if rep["ok"]:
        return
    bad = "; ".join(f"{c['name']}: {c['detail']}" for c in rep["checks"] if not c["ok"])
    full = spelled(f"`grass-index verify {path}`", f"`grass_index.verify_index({str(path)!r})`")
    raise ServeError(f"index {path} failed verification ({bad}); run {full} for the full "
                     f"report and {repair_command(path)} to rebuild what the stored sketches "
                     "allow")


def batch_friendly_search(threshold: int = 2) -> None:
    """Make FAISS answer a batch of queries with one matrix product (process-wide).

    Below ``faiss.cvar.distance_compute_blas_threshold`` queries per call, a flat index is
    scanned once per query; the default is far above a served batch (a few to a few dozen
    queries), so a batch of 16 cost 16 scans: measured on digits (1 thread), 144 ms -> 35 ms
    for 16 queries. A lone query (below 2) keeps the single scan, which is faster for one.
    """
    import faiss

    faiss.cvar.distance_compute_blas_threshold = threshold


class NonFiniteQuery(GrassIndexError, ValueError):
    """A query whose scores are not finite numbers (a finite sketch far outside the training
    data's range can overflow float32 in the dot products; a non-finite sketch is already
    refused by the sketcher): there is no ranking to return, and JSON has no Infinity."""


def all_finite(results: list) -> bool:
    return all(math.isfinite(row["score"]) for one in results
               for rows in (one["proponents"], one.get("opponents", ())) for row in rows)


@dataclass
class Job:
    """One request's examples and what it wants back."""

    items: list
    ids: list            # what to call each example in the reply ("example": ...)
    source: str          # "query_data", "train_data", "text", or the uploaded file's name
    k: int = 10
    opponents: bool = False
    images: bool = False
    timing: dict = field(default_factory=dict)


class Engine:
    """The loaded index + task + model + data; ``run(jobs)`` is called on one thread only."""

    def __init__(self, index_dir, task: str | None = None, *, verify: bool = True):
        path = Path(index_dir)
        if not path.is_dir():
            raise ServeError(f"{path} is not a directory; pass an index directory made by "
                             + spelled("`grass-index build`", "build_index()"))
        t0 = time.perf_counter()
        if verify:
            verify_or_refuse(path)
        self.path = path
        self.idx = gi.open_index(path)
        self.task = resolve_task(self.idx, task)
        self.model = self.task.index_model()  # an ensemble: its checkpoints
        # checked and bound once: a per-request check would hash the whole model every time
        self.sketcher = self.idx.query_sketcher(self.model)
        self.train = self.task.train_data()
        if len(self.train) != self.idx.n_train:
            raise ServeError(f"task {self.task.ref} has {len(self.train)} training examples but "
                             f"index {path} holds {self.idx.n_train}; serve with the task the "
                             f"index was built from ({spelled('--task FILE', 'task=FILE')})")
        self.queries = self.task.query_data() if self.task.has("query_data") else None
        self.idx.vindex  # load FAISS now, not on the first request
        self._hold_low_rank_rows()
        self._labels: dict[int, Any] = {}
        self._self_influence: list | None = None  # (train_id, score), highest first
        self.load_seconds = time.perf_counter() - t0

    def _hold_low_rank_rows(self) -> None:
        """A two-stage index re-ranks every batch through the preconditioner: a one-off query
        streams its low-rank layers' rows (twice), a server reads them once and keeps them."""
        from grass_index.index import SketchedIndex
        from grass_index.index.store_scan import StoreScan

        if isinstance(self.idx.vindex, StoreScan):  # every query is preconditioned: map it now
            self.idx.preconditioner
        if isinstance(self.idx.vindex, SketchedIndex):
            pre = self.idx.preconditioner
            if pre.forms and any(f.kind == "low_rank" for f in pre.forms.values()):
                pre.rows()

    # -- what the task offers ---------------------------------------------------------------
    def features(self) -> dict:
        has = self.task.has
        return dict(text=has("encode"), image=has("image"), label=has("label"),
                    query_data=self.queries is not None)

    def split(self, name: str):
        """The task's query or training data (None when the task has no query data)."""
        return self.train if name == "train" else self.queries

    def encode(self, text: str) -> list:
        return [self.task.encode(text)]

    def label(self, item) -> str | None:
        if not self.task.has("label"):
            return None
        try:
            return self.task.label(item)
        except Exception as e:  # e.g. an uploaded example without the part label() reads
            log.debug("label(item) failed: %s", e)
            return None

    def train_label(self, i: int) -> str | None:
        if i not in self._labels:
            self._labels[i] = self.label(self.train[i])
        return self._labels[i]

    def image_url(self, item) -> str | None:
        """The task's image of an item as an inline PNG (data: URL), or None."""
        if not self.task.has("image"):
            return None
        from grass_index.images import encode_png, tile_image

        try:
            rgb = tile_image(self.task.image(item), IMAGE_PX)
        except Exception as e:
            log.debug("image(item) failed: %s", e)
            return None
        return "data:image/png;base64," + base64.b64encode(encode_png(rgb)).decode("ascii")

    def train_example(self, i: int, image: bool = True) -> dict:
        out = dict(train_id=i, label=self.train_label(i))
        if image:
            out["image"] = self.image_url(self.train[i])
        return out

    def list_examples(self, split: str, offset: int, limit: int) -> list[dict]:
        data = self.split(split)
        hi = min(len(data), offset + limit)
        return [dict(id=i, label=self.label(data[i])) for i in range(offset, hi)]

    def self_influence(self, offset: int, limit: int, images: bool) -> dict:
        """Training examples ranked by self-influence, rows ``offset..offset+limit-1``.

        Computed from the stored sketches on the first request (one pass over the store, no
        gradient) and kept until the index's generation changes (``refresh``).
        """
        self.refresh()
        if self._self_influence is None:
            from grass_index.analysis import rank_self_influence

            t0 = time.perf_counter()
            self._self_influence = rank_self_influence(self.idx.self_influence().numpy())
            log.info("self-influence of %d training examples ranked in %.2f s",
                     len(self._self_influence), time.perf_counter() - t0)
        rows = []
        for rank, (i, s) in enumerate(self._self_influence[offset:offset + limit], offset + 1):
            row = dict(rank=rank, train_id=i, score=s, label=self.train_label(i))
            if images:
                row["image"] = self.image_url(self.train[i])
            rows.append(row)
        return dict(total=len(self._self_influence), offset=offset, results=rows)

    # -- the batched work ---------------------------------------------------------------------
    def warm_up(self) -> None:
        """Answer two queries once before serving (as one batch: the path concurrent requests
        take), so the first request does not pay for lazy set-up (the sketcher's first call,
        BLAS, FAISS's batched search) and what that set-up creates is loaded like the rest."""
        data = self.queries if self.queries is not None and len(self.queries) else self.train
        if len(data):
            items = [data[0], data[min(1, len(data) - 1)]]
            self.run([Job(items=[it], ids=[0], source="warm-up", k=1) for it in items])

    def _sketch(self, items: list):
        return self.idx.query_sketches(self.model, items, self.task.loss,
                                       collate=self.task.collate, batch_size=max(1, len(items)),
                                       sketcher=self.sketcher)

    def refresh(self) -> bool:
        """Pick up the index's newest generation (an add or remove committed while serving:
        the index handle re-reads config.json when it changed, one stat otherwise); the
        training data is read again when it grew. True when a new generation is served."""
        if not self.idx.refresh():
            return False
        self._self_influence = None
        if len(self.train) != self.idx.n_train:
            self.train = self.task.train_data()
            self._labels.clear()
            if len(self.train) != self.idx.n_train:
                log.warning("task %s has %d training examples, the index's new generation %d",
                            self.task.ref, len(self.train), self.idx.n_train)
        log.info("serving generation %d of %s", self.idx.generation, self.path)
        return True

    def run(self, jobs: list[Job]) -> list:
        """One reply (list of per-example dicts) or one Exception per job."""
        self.refresh()
        t0 = time.perf_counter()
        out: list = [None] * len(jobs)
        try:  # the common case: every job is fine, so one call sketches them all
            q = self._sketch([it for j in jobs for it in j.items])
            per_job, lo = [], 0
            for j in jobs:
                per_job.append(q[lo:lo + len(j.items)])
                lo += len(j.items)
        except Exception as e:
            if len(jobs) == 1:
                return [e]
            per_job = []  # find the culprit: each job alone, so only its caller sees the error
            for j in jobs:
                try:
                    per_job.append(self._sketch(j.items))
                except Exception as e1:
                    per_job.append(e1)
        t1 = time.perf_counter()
        ok = [r for r, s in enumerate(per_job) if not isinstance(s, Exception)]
        for r, s in enumerate(per_job):
            if isinstance(s, Exception):
                out[r] = s
        if ok:
            q = torch.cat([per_job[r] for r in ok])
            kmax = max(jobs[r].k for r in ok)
            pro = self.idx.search(q, kmax)
            want_opp = [r for r in ok if jobs[r].opponents]
            opp_rows = {}
            if want_opp:
                rows, lo = [], 0
                for r in ok:
                    if jobs[r].opponents:
                        rows.append(per_job[r])
                        opp_rows[r] = lo
                        lo += len(per_job[r])
                opp = self.idx.search(torch.cat(rows), max(jobs[r].k for r in want_opp),
                                      opponents=True)
            t2 = time.perf_counter()
            lo = 0
            for r in ok:
                j = jobs[r]
                res = []
                for e, (ex_id, item) in enumerate(zip(j.ids, j.items)):
                    one = dict(example=ex_id, source=j.source, label=self.label(item),
                               proponents=self._rows(pro[lo + e][:j.k], j.images))
                    if j.opponents:
                        one["opponents"] = self._rows(opp[opp_rows[r] + e][:j.k], j.images)
                    if j.images:
                        one["image"] = self.image_url(item)
                    res.append(one)
                lo += len(j.items)
                out[r] = res if all_finite(res) else NonFiniteQuery(
                    "the query's scores overflowed float32 (inf or NaN): its values are far "
                    "outside what the model was trained on")
                j.timing.update(sketch_ms=(t1 - t0) * 1e3, search_ms=(t2 - t1) * 1e3,
                                batch=len(jobs))
        return out

    def _rows(self, hits, images: bool) -> list[dict]:
        rows = []
        for i, s in hits:
            row = dict(train_id=i, score=s, label=self.train_label(i))
            if images:
                row["image"] = self.image_url(self.train[i])
            rows.append(row)
        return rows
