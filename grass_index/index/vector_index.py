"""VectorIndex: FAISS maximum-inner-product search over preconditioned sketches.

Score = <query, row>, positive = proponent (the sign convention, docs/design.md). Ids are training ids.
``flat`` is exact (IndexIDMap2 over IndexFlatIP, so rows can be reconstructed by id); ``ivf``
(IVF{nlist},Flat, inner product, hashtable direct map for reconstruct) trades recall for speed
on large corpora — measure it with :func:`recall_at_k` against ``flat``.

``dtype="float16"`` stores the vectors as FAISS SQfp16 codes (half the memory and disk; queries
stay float32). float16 overflows at 65504 and loses precision below 6e-5, while preconditioned
sketches can sit anywhere in float32's range — and their layers' blocks differ by orders of
magnitude (the preconditioner divides each by its own Fisher scale). So every column j is
stored times a power of two 2**e_j (exact) that puts the first vectors' largest |entry| of that
column in [2**3, 2**4): at least 4096x headroom for later vectors (an error, never an inf,
beyond it), while entries 10^4 times smaller than that still keep ~0.1% precision (float16's
subnormals). Queries are multiplied by 2**-e_j, so inner products — the scores — are unchanged.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import faiss
import numpy as np

from ..errors import spelled
from . import _file, gpu
from ._file import FaissIndexError

KINDS = ("flat", "ivf")
DTYPES = ("float32", "float16")
SPECS = ("flat", "ivf", "flat:fp16", "ivf:fp16")  # plus ",shards=N" on any of them
FP16_MAX = 65504.0
FP16_TARGET_EXP = 4  # the first vectors' largest |entry| is scaled into [2**3, 2**4)
ADD_CHUNK = 65536
SEARCH_CHUNK = 4096


class IndexSpec(NamedTuple):
    """What ``--index`` names: ``KIND[:OPTION,...]``, e.g. ``flat``, ``ivf:fp16``,
    ``flat:fp16,shards=4``. Options: ``fp16`` (float16 storage), ``shards=N`` (N part files
    searched as one), ``faiss`` (an exact float32 index in a FAISS file of its own, e.g. for
    FAISS's GPU search; without it the exact index scans the sketch store's rows)."""
    kind: str
    dtype: str = "float32"
    shards: int = 1
    sketch: int = -1  # search sketch width: -1 = by memory and recall (choice.py), 0 = exact
    rerank: int = 0  # two-stage search: candidates per result (0: chosen by measured recall)
    budget: int = -1  # MB the exact index may take (-1: half the RAM available, choice.py)
    in_faiss: bool = False  # an exact flat float32 index copied into a FAISS file

    @property
    def scans_store(self) -> bool:
        """Exact float32 search in one part is a scan of the store's own rows (no FAISS
        file, grass_index/indexdir/scan.py) unless ``faiss`` asks for the copy."""
        return (self.kind == "flat" and self.dtype == "float32" and self.shards == 1
                and not self.in_faiss)

    def __str__(self) -> str:
        opts = (["fp16"] if self.dtype == "float16" else []) + (
            [f"shards={self.shards}"] if self.shards > 1 else []) + (
            ["exact"] if self.sketch == 0 else [f"sketch={self.sketch}"] if self.sketch > 0
            else []) + ([f"rerank={self.rerank}"] if self.rerank > 0 else []) + (
            [f"budget={self.budget}"] if self.budget >= 0 else []) + (
            ["faiss"] if self.in_faiss else [])
        return self.kind + (":" + ",".join(opts) if opts else "")


def parse_spec(spec) -> IndexSpec:
    """``flat`` | ``ivf``, then optionally ``:`` and comma-separated options (``fp16``,
    ``shards=N``, ``sketch=D``, ``exact``, ``rerank=R``); ``flat,shards=3`` reads as
    ``flat:shards=3``."""
    if isinstance(spec, IndexSpec):
        return spec
    kind, colon, options = str(spec).partition(":")
    if not colon and "," in kind:  # "flat,shards=3" (an older README's grammar): the same index
        kind, _, options = kind.partition(",")
    dtype, shards, bad = "float32", 1, kind not in KINDS
    sketch, rerank, budget, in_faiss = -1, 0, -1, False
    for opt in filter(None, options.split(",")) if options else []:
        key, eq, value = opt.strip().partition("=")
        if key in ("fp16", "fp32") and not eq:
            dtype = "float16" if key == "fp16" else "float32"
        elif key == "shards" and value.isdigit() and int(value) >= 1:
            shards = int(value)
        elif key == "exact" and not eq:
            sketch = 0
        elif key == "sketch" and value.isdigit():
            sketch = int(value)
        elif key == "rerank" and value.isdigit() and int(value) >= 1:
            rerank = int(value)
        elif key == "budget" and value.isdigit():
            budget = int(value)
        elif key == "faiss" and not eq:
            in_faiss = True
        else:
            bad = True
    if bad or (options == "" and ":" in str(spec)):
        raise FaissIndexError(f"unknown index {spec!r}; use flat or ivf, optionally with :fp16 "
                              "and/or shards=N, e.g. flat, ivf, flat:fp16, ivf:fp16,shards=4 "
                              "(flat is exact; ivf approximate; fp16 halves memory and disk; "
                              "shards=N writes N files searched as one; sketch=D searches a "
                              "D-wide sketch and re-ranks R·k candidates exactly, rerank=R; "
                              "exact: never sketch; budget=MB: exact when the vectors fit "
                              "in MB, else sketched; faiss: the exact vectors in a FAISS file "
                              "instead of scanned from the sketch store)")
    return IndexSpec(kind, dtype, shards, sketch, rerank, budget, in_faiss)


def default_nlist(n_train: int) -> int:
    """~4·sqrt(n) lists, but at least 39 training points per list (FAISS's k-means minimum)."""
    return max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))


def default_nprobe(nlist: int) -> int:
    # measured on clustered data (tests/test_index.py): nlist=205 -> nprobe 26 gives
    # recall@10 0.994 (8 probes: 0.94); raise it for harder data (search(..., nprobe=)).
    return max(1, min(nlist, math.ceil(nlist / 8)))


class VectorIndex:
    def __init__(self, index, *, kind: str, dim: int, nlist=None, nprobe=None, readonly=False,
                 dtype: str = "float32", exponents=None, recall: dict | None = None,
                 build_key: str | None = None):
        self._index = index
        # which build's vectors these are (written into the file): a reader checks it before
        # serving, so a file copied from another index under the expected name is refused
        self.build_key = build_key
        self.kind = kind
        self.dim = dim
        self.dtype = dtype
        # float16 only: stored[:, j] = vector[:, j] * 2**exponents[j], fixed by the first vectors
        self.exponents = None if exponents is None else np.asarray(exponents, np.int32)
        self.recall = recall  # recall@k against exact search, measured by the builder
        self.nlist = nlist
        self.nprobe = nprobe
        self.metric = "ip"
        self.readonly = readonly
        self._gpu = None  # False: no GPU copy possible; else the GPU copy of _index (gpu.py)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, dim: int, kind: str = "flat", *, nlist: int | None = None,
               nprobe: int | None = None, metric: str = "ip",
               dtype: str = "float32") -> "VectorIndex":
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise FaissIndexError(f"dim must be a positive integer, got {dim!r}")
        if metric != "ip":
            raise FaissIndexError(f"metric {metric!r} is not supported: attribution scores are "
                                  "inner products, use metric='ip'")
        if kind not in KINDS:
            raise FaissIndexError(f"unknown index kind {kind!r}; choose one of {KINDS}")
        if dtype not in DTYPES:
            raise FaissIndexError(f"unknown index dtype {dtype!r}; choose one of {DTYPES}")
        for name, v in (("nlist", nlist), ("nprobe", nprobe)):
            if v is not None and (not isinstance(v, (int, np.integer)) or v <= 0):
                raise FaissIndexError(f"{name} must be a positive integer, got {v!r}")
        dim = int(dim)
        if kind == "flat":
            if nlist is not None or nprobe is not None:
                raise FaissIndexError("nlist/nprobe only apply to kind='ivf'")
            base = faiss.IndexFlatIP(dim) if dtype == "float32" else faiss.IndexScalarQuantizer(
                dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            return cls(faiss.IndexIDMap2(base), kind="flat", dim=dim, dtype=dtype)
        self = cls(None, kind="ivf", dim=dim, nlist=nlist, nprobe=nprobe, dtype=dtype)
        if nlist is not None:
            self._build_ivf(int(nlist))
        return self

    def _build_ivf(self, nlist: int) -> None:
        codes = "Flat" if self.dtype == "float32" else "SQfp16"
        index = faiss.index_factory(self.dim, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by arbitrary id
        self.nlist = nlist
        self.nprobe = min(self.nprobe or default_nprobe(nlist), nlist)
        index.nprobe = self.nprobe
        self._index = index

    @property
    def needs_training(self) -> bool:
        return self.kind == "ivf" and (self._index is None or not self._index.is_trained)

    def train(self, sample) -> None:
        """Train the IVF coarse quantizer on a representative sample (≥ 39·nlist rows ideal)."""
        if self.kind != "ivf":
            return
        x = self._vectors(sample, "training sample")
        if self._index is None:
            self._build_ivf(default_nlist(len(x)))
        if self._index.ntotal:
            raise FaissIndexError("the IVF index already holds vectors; train before adding")
        if len(x) < self.nlist:
            raise FaissIndexError(f"IVF with nlist={self.nlist} needs at least {self.nlist} "
                                  f"training vectors (ideally {39 * self.nlist}), got {len(x)}; "
                                  "pass a larger sample or a smaller nlist")
        self._index.train(self._stored(x, "training sample"))

    def fix_scales(self, sample) -> None:
        """Fix the float16 column scales from a sample without adding it (no-op for float32,
        or once fixed) — so parts made by :meth:`empty_like` share them."""
        if self.dtype == "float16" and self.exponents is None:
            self._stored(self._vectors(sample, "sample"), "sample")

    def empty_like(self) -> "VectorIndex":
        """An empty index built like this empty one: same kind, dtype, float16 scales and
        trained IVF quantizer, so its scores are comparable (a part of a sharded index)."""
        if self.ntotal:
            raise FaissIndexError("empty_like copies an empty index; call it before adding")
        if self.needs_training:
            raise FaissIndexError("the IVF index must be trained first: call train(sample)")
        return VectorIndex(faiss.clone_index(self._index), kind=self.kind, dim=self.dim,
                           nlist=self.nlist, nprobe=self.nprobe, dtype=self.dtype,
                           exponents=self.exponents, build_key=self.build_key)

    def emptied(self) -> "VectorIndex":
        """An empty copy of this index, built like it (kind, dtype, float16 scales, trained IVF
        quantizer) but without its vectors: a grown living index keeps its quantizer."""
        index = faiss.clone_index(self._index)
        index.reset()
        return VectorIndex(index, kind=self.kind, dim=self.dim, nlist=self.nlist,
                           nprobe=self.nprobe, dtype=self.dtype, exponents=self.exponents,
                           build_key=self.build_key)

    def centroid_distance(self, vectors) -> float:
        """IVF: the mean distance of ``vectors`` to the centroid of the list each is assigned
        to (how well the quantizer fits them; a living index compares new rows with old)."""
        if self.kind != "ivf" or self.needs_training:
            raise FaissIndexError("centroid_distance needs a trained IVF index")
        x = self._stored(self._vectors(vectors, "vectors"), "vectors")
        quantizer = faiss.downcast_index(self._index.quantizer)
        _, lists = quantizer.search(x, 1)
        centroids = quantizer.reconstruct_n(0, self.nlist)
        return float(np.linalg.norm(x - centroids[lists[:, 0]], axis=1).mean())

    def merge_from(self, other: "VectorIndex") -> None:
        """Move ``other``'s vectors (disjoint ids) into this index; both must come from one
        :meth:`empty_like` template, so their codes and IVF lists mean the same."""
        if (other.kind, other.dim, other.dtype, other.nlist) != (self.kind, self.dim, self.dtype,
                                                                 self.nlist) or not (
                _same(self.exponents, other.exponents) and _same_centroids(self, other)):
            raise FaissIndexError("cannot merge indexes built differently (kind, dim, dtype, "
                                  "nlist, float16 scales or IVF centroids differ)")
        if self.kind == "ivf":  # FAISS cannot merge IVF direct maps: drop them, then rebuild
            for ix in (self._index, other._index):
                ix.set_direct_map_type(faiss.DirectMap.NoMap)
            self._index.merge_from(other._index, 0)
            self._index.set_direct_map_type(faiss.DirectMap.Hashtable)
        else:
            self._index.merge_from(other._index, 0)

    def to_bytes(self) -> tuple[np.ndarray, dict]:
        """The index as one uint8 array plus its metadata (to send to other processes)."""
        return faiss.serialize_index(self._index), self.describe()

    @classmethod
    def from_bytes(cls, data: np.ndarray, meta: dict) -> "VectorIndex":
        return cls(faiss.deserialize_index(np.asarray(data, np.uint8)), kind=meta["kind"],
                   dim=meta["dim"], nlist=meta.get("nlist"), nprobe=meta.get("nprobe"),
                   dtype=meta.get("dtype", "float32"), exponents=meta.get("exponents"),
                   recall=meta.get("recall"), build_key=meta.get("build_key"))

    # -- data -----------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _vectors(self, v, what: str) -> np.ndarray:
        v = np.asarray(v)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise FaissIndexError(f"{what} must have shape (n, {self.dim}), got {v.shape}")
        if v.dtype.kind != "f":
            raise FaissIndexError(f"{what} must be floating point, got {v.dtype}")
        v = np.ascontiguousarray(v, dtype=np.float32)
        if not np.isfinite(v).all():
            raise FaissIndexError(f"{what} contains NaN or inf (rows "
                                  f"{np.flatnonzero(~np.isfinite(v).all(1))[:10].tolist()})")
        return v

    def add(self, vectors, ids) -> None:
        """Add rows under their training ids (int64, non-negative, unique within the call)."""
        if self.readonly:
            raise FaissIndexError("this index was loaded with mmap=True and is read-only; load "
                                  "it with mmap=False to add vectors")
        if self.needs_training:
            raise FaissIndexError("the IVF index must be trained first: call train(sample)")
        x = self._vectors(vectors, "vectors")
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) != len(x) or (ids.size and ids.dtype.kind not in "iu"):
            raise FaissIndexError(f"ids must be {len(x)} integers (one per vector), got shape "
                                  f"{ids.shape} dtype {ids.dtype}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or len(np.unique(ids)) != len(ids)):
            raise FaissIndexError("ids must be non-negative and unique (training ids)")
        x = self._stored(x, "vectors")
        for lo in range(0, len(x), ADD_CHUNK):
            self._index.add_with_ids(x[lo: lo + ADD_CHUNK], ids[lo: lo + ADD_CHUNK])

    def _stored(self, x: np.ndarray, what: str) -> np.ndarray:
        """x as stored: float16 columns scaled by powers of two, after a range check."""
        if self.dtype == "float32" or not len(x):
            return x
        top = np.abs(x).max(0)
        if self.exponents is None:  # the first vectors fix the scales (exact powers of two)
            exp = FP16_TARGET_EXP - np.frexp(top)[1]
            if (top > 0).any():  # columns all zero so far: the scale of the largest column
                exp[top == 0] = FP16_TARGET_EXP - np.frexp(top.max())[1]
            self.exponents = exp.astype(np.int32)
        scaled = np.ldexp(x, self.exponents)
        over = np.abs(scaled).max(0) >= FP16_MAX
        if over.any():
            j = int(np.flatnonzero(over)[0])
            raise FaissIndexError(
                f"{what} has entries up to {top[j]:.3g} in column {j}, beyond float16's range "
                f"at this index's scale for that column (fixed by the first vectors, whose "
                f"largest entry there was below "
                f"{math.ldexp(1.0, FP16_TARGET_EXP - int(self.exponents[j])):.3g}"
                "); build a float32 index instead ("
                + spelled("--index flat or ivf", "index='flat' or 'ivf'") + ", without :fp16)")
        return scaled.astype(np.float32)

    def _queries(self, q: np.ndarray) -> np.ndarray:
        """Queries in the stored vectors' scaled coordinates (inner products unchanged)."""
        if self.exponents is None:
            return q
        return np.ldexp(q, -self.exponents).astype(np.float32)

    def search(self, queries, k: int, *, opponents: bool = False, nprobe: int | None = None):
        """Top-k by inner product: (scores float32 (m, k'), ids int64 (m, k')).

        Proponents: largest scores first. ``opponents=True``: most negative scores first (the
        true signed scores are returned). k is clamped to ntotal (k' = min(k, ntotal)). IVF may
        find fewer than k' rows in the probed lists; those slots hold id -1 and score -inf
        (proponents) / +inf (opponents).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise FaissIndexError(f"k must be a positive integer, got {k!r}")
        q = self._vectors(queries, "queries")
        kk = min(int(k), self.ntotal)
        if kk == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        q = self._queries(q)
        if opponents:
            q = -q
        params = None
        if self.kind == "ivf" and nprobe is not None:
            params = faiss.SearchParametersIVF(nprobe=int(min(nprobe, self.nlist)))
        scores = np.empty((len(q), kk), np.float32)
        ids = np.empty((len(q), kk), np.int64)
        searcher = self._searcher(kk) if params is None else self._index
        for lo in range(0, len(q), SEARCH_CHUNK):
            s, i = searcher.search(q[lo: lo + SEARCH_CHUNK], kk, params=params)
            scores[lo: lo + len(s)], ids[lo: lo + len(s)] = s, i
        if opponents:
            np.negative(scores, out=scores)
        scores[ids < 0] = np.inf if opponents else -np.inf
        return scores, ids

    def _searcher(self, k: int):
        """The GPU copy of the index when FAISS has a GPU (gpu.py), else the CPU index."""
        if k > gpu.GPU_MAX_K:
            return self._index
        if self._gpu is None or (self._gpu is not False and self._gpu[0] != self._index.ntotal):
            copy = gpu.gpu_copy(self._index)
            self._gpu = False if copy is None else (self._index.ntotal, copy)
        return self._index if self._gpu is False else self._gpu[1]

    def reconstruct(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), np.float32)
        for j, i in enumerate(ids):
            try:
                out[j] = self._index.reconstruct(int(i))
            except RuntimeError:
                raise KeyError(f"id {int(i)} is not in the index") from None
        return out if self.exponents is None else self._queries(out)

    def ids(self) -> np.ndarray:
        """All stored ids (for consistency checks against the sketch store)."""
        if self._index is None:
            return np.empty(0, np.int64)
        if self.kind == "flat":
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        inv = self._index.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)).copy()
                 for lst in range(inv.nlist) if inv.list_size(lst)]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def describe(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "metric": self.metric, "ntotal": self.ntotal,
                "nlist": self.nlist, "nprobe": self.nprobe, "trained": not self.needs_training,
                "dtype": self.dtype, "recall": self.recall,
                "exponents": None if self.exponents is None else self.exponents.tolist(),
                "build_key": self.build_key, "faiss_version": faiss.__version__}

    def __repr__(self) -> str:
        return (f"VectorIndex(kind={self.kind!r}, dtype={self.dtype!r}, dim={self.dim}, "
                f"ntotal={self.ntotal})")

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write atomically (temp file + fsync + rename): readers see the old or new file."""
        if self._index is None:
            raise FaissIndexError("nothing to save: the IVF index was never trained")
        _file.write(path, self._index, self.describe())

    @classmethod
    def load(cls, path, mmap: bool = False, *, verify: bool = True) -> "VectorIndex":
        """Load a saved index; ``mmap=True`` maps the vectors instead of reading them (read-only).

        ``verify`` checks the file's CRC first (one sequential read) so corruption is reported.
        """
        meta = _file.read_meta(path, verify=verify)
        kind = meta.get("kind")
        if kind not in KINDS:
            raise FaissIndexError(f"{path} records unknown index kind {kind!r}")
        flags = 0
        if mmap:
            flags = (faiss.IO_FLAG_MMAP if kind == "ivf" else faiss.IO_FLAG_MMAP_IFC) \
                | faiss.IO_FLAG_READ_ONLY
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as e:
            raise FaissIndexError(f"FAISS could not read {path}: {e}. Rebuild the index from the "
                                  "sketch store.") from e
        if index.d != meta["dim"] or index.ntotal != meta["ntotal"]:
            raise FaissIndexError(f"{path}: the FAISS data ({index.d}-d, {index.ntotal} rows) "
                                  f"disagrees with its metadata; rebuild the index.")
        self = cls(index, kind=kind, dim=meta["dim"], nlist=meta.get("nlist"),
                   nprobe=meta.get("nprobe"), readonly=mmap, dtype=meta.get("dtype", "float32"),
                   exponents=meta.get("exponents"), recall=meta.get("recall"),
                   build_key=meta.get("build_key"))
        if kind == "ivf":
            index.nprobe = self.nprobe
        return self


def check_serves(vindex: VectorIndex, build_key: str, n: int, where: str, *,
                 ids_below: int | None = None) -> None:
    """The cheap invariants a reader relies on before answering from ``vindex``: written for
    this build, ``n`` vectors, ids in 0..ids_below-1 (default ``n``: exactly 0..n-1; a living
    index with removed examples holds fewer), no duplicates."""
    keys = {getattr(p, "build_key", None) for p in getattr(vindex, "parts", [vindex])}
    if keys != {build_key}:
        raise FaissIndexError(f"{where} was written for another build (build key "
                              f"{', '.join(sorted(map(str, keys)))}; this index's config expects "
                              f"{build_key})")
    if vindex.ntotal != n:
        raise FaissIndexError(f"{where} holds {vindex.ntotal} vectors, the config says {n}")
    ids, top = vindex.ids(), n if ids_below is None else ids_below
    if len(ids) and (ids.min() < 0 or ids.max() >= top):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise FaissIndexError(f"{where} holds id {bad}, outside the training ids 0..{top - 1}")
    if len(np.unique(ids)) != len(ids):
        raise FaissIndexError(f"{where} holds duplicated ids")


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def _same_centroids(a: VectorIndex, b: VectorIndex) -> bool:
    """IVF parts must share the coarse quantizer, or their lists mean different things."""
    if a.kind != "ivf":
        return True
    ca, cb = (faiss.downcast_index(v._index.quantizer).reconstruct_n(0, v.nlist) for v in (a, b))
    return np.array_equal(ca, cb)
