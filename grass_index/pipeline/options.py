"""The options of a build, as two dataclasses, and their checks.

``BuildOptions`` are what the raw sketches depend on (pass 1); their fields are build.json's
keys of the same names. ``IndexOptions`` are what pass 2 depends on (Hessian, damping, FAISS
index); ``IndexOptions.record()`` is what a worker's shard records for the merge and what
config.json records (``hessian``, ``damping``, and ``index_kind`` for ``index``). Changing
IndexOptions re-runs pass 2 only; changing BuildOptions needs a new build.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from ..index import SPECS, FaissIndexError, parse_spec
from ..precondition import HESSIANS as _HESSIAN_NAMES
from ..precondition import DEFAULT_DAMPING, PreconditionError, canonical_hessian, parse_damping
from ..indexdir.errors import AttributionError

HESSIANS = {h.lower(): h for h in _HESSIAN_NAMES}  # lower-case spelling -> canonical name
INDEX_KINDS = SPECS  # flat, ivf, flat:fp16, ivf:fp16


def norm_hessian(hessian: str) -> str:
    """The canonical Hessian name ('efim' -> 'eFIM'), or an AttributionError naming the choices."""
    try:
        return canonical_hessian(str(hessian))
    except PreconditionError:
        raise AttributionError(f"unknown hessian {hessian!r}; use 'eFIM', 'ekfac' or "
                               "'identity'") from None


def damping_key(damping) -> Any:
    """How a damping is recorded (and hashed): its string ("auto" for a new default build), or
    None — only for an index built before "auto" was the default, where it means 0.3 × mean
    eigenvalue (precondition.damping.LEGACY_DAMPING)."""
    return None if damping is None else str(damping)


def check_damping(damping) -> None:
    try:
        parse_damping(damping)
    except ValueError as e:  # the message names the value, the range and why
        raise AttributionError(str(e)) from e


def check_index(index) -> None:
    try:
        parse_spec(index)
    except FaissIndexError as e:
        raise AttributionError(str(e)) from None


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttributionError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_train_data(train_data: Sequence) -> None:
    if not (hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__")):
        raise AttributionError("train_data must be an indexable sequence (len() and [i])")
    if len(train_data) == 0:
        raise AttributionError("train_data is empty; nothing to index")


def split_layers(layers) -> list[str] | None:
    """Layer globs from a list, or a comma-separated string; None = every supported layer."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    return [p.strip() for item in layers for p in str(item).split(",") if p.strip()]


@dataclass(frozen=True)
class BuildOptions:
    """What pass 1 (the raw sketches) depends on; recorded in build.json under these names.

    ``selective_mask`` is the path of a mask file from `grass-index selective-mask fit`
    (needed by ``selective_mask-…`` specs); build.json records the hash of its content."""

    sparsification: str = "random_mask-128*128"
    projection: str = "sjlt-4096"
    seed: int = 0
    layers: list[str] | None = None
    batch_size: int = 32
    selective_mask: Any = None
    # processes that collate pass 1's batches ahead of it (None: by CPU count; 0: in-process).
    # Not recorded: the batches, hence the sketches, are the same for any value.
    workers: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", split_layers(self.layers))
        check_batch_size(self.batch_size)
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise AttributionError(f"workers={self.workers!r}: give a count >= 0 (0 collates "
                                   "in the building process)")

    def record(self) -> dict:
        """build.json's keys for these options (the mask is recorded by its hash elsewhere)."""
        return dict(sparsification=self.sparsification, projection=self.projection,
                    seed=self.seed, layers=self.layers)


@dataclass(frozen=True)
class IndexOptions:
    """What pass 2 depends on: the Hessian, its damping and the FAISS index. ``damping``:
    "auto" by default (recorded as such); None is what older indexes record (0.3 × mean
    eigenvalue) and ``from_record`` keeps it."""

    hessian: str = "eFIM"
    damping: Any = DEFAULT_DAMPING
    index: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "hessian", norm_hessian(self.hessian))
        check_index(self.index)
        check_damping(self.damping)

    def record(self) -> dict:
        """What a worker's shard records for the merge (the keys ``merge`` reads back)."""
        return dict(hessian=self.hessian, damping=damping_key(self.damping), index=self.index,
                    nlist=self.nlist, nprobe=self.nprobe)

    def replace(self, **changes) -> "IndexOptions":
        """A copy with the non-None ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_record(cls, record: dict | None) -> "IndexOptions":
        rec = dict(record or {})
        return cls(hessian=rec.get("hessian") or "eFIM", damping=rec.get("damping"),
                   index=rec.get("index") or "flat", nlist=rec.get("nlist"),
                   nprobe=rec.get("nprobe"))
