"""The two records of an index directory as frozen, typed values, checked once where they are
read: ``BuildRecord`` (build.json: what the raw sketches depend on) and ``IndexRecord``
(config.json: the build record plus what pass 2 did).

A record read from disk is untrusted: every field is checked for its type and range here, and
against the others (``dim`` is the sum of ``layout``, ``n_blocks`` the batch count, an
ensemble's ``checkpoints`` its layout blocks), so a corrupted or forged record is refused
with one line naming the file and the field — never an internal error deep in a query, never
a wrong number. ``raw`` keeps the JSON exactly as read (read-only): writers and hashes use
the dicts, so what is on disk stays byte for byte what the build wrote.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from ..batching import batch_count
from ..compress import CompressError
from ..compress import parse_spec as parse_compression
from ..index import FaissIndexError
from ..index import parse_spec as parse_index_spec
from ..precondition import HESSIANS, PreconditionError, parse_damping
from ..errors import repair_command
from .errors import AttributionError
from .generations import Generation

KEY = re.compile(r"^[0-9a-f]{12}$")  # a pass-2 variant's key: it names files (index-KEY.faiss)
BLOCK = re.compile(r"^c(\d+)/")  # an ensemble's layout block: c{checkpoint}/{layer}


class Bad(ValueError):
    """A field's value is out of its type or range (the message says what it must be)."""


# --- field checks: each returns the typed value or raises Bad --------------------------------

def _int(v, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise Bad(f"must be {rng}, got {v!r}")
    return v


def _positive(v) -> int:
    return _int(v, 1)


def _str(v) -> str:
    if not isinstance(v, str) or not v:
        raise Bad(f"must be a non-empty string, got {v!r}")
    return v


def _opt(check):
    return lambda v: None if v is None else check(v)


def _dict(v) -> Mapping:
    if not isinstance(v, dict):
        raise Bad(f"must be a JSON object, got {type(v).__name__}")
    return MappingProxyType(v)


def _strings(v) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise Bad(f"must be a list of non-empty strings, got {v!r}")
    return tuple(v)


def _fraction(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise Bad(f"must be a number in [0, 1], got {v!r}")
    return float(v)


def _finite(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Bad(f"must be a finite number, got {v!r}")
    return float(v)


def _layout(v) -> Mapping[str, int]:
    if not isinstance(v, dict) or not v:
        raise Bad(f"must be a non-empty object of layer name -> width, got {v!r:.80}")
    for name, k in v.items():
        if not isinstance(name, str) or isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise Bad(f"must map layer names to positive integers; {name!r}: {k!r}")
    return MappingProxyType(dict(v))


def _layer_dims(v) -> tuple[Mapping, ...]:
    """One {name, kind, d_in, d_out, has_bias, numel} per layer (d_in/d_out None for layers
    that have no such dimension, e.g. an EmbeddingBag's flat route)."""
    keys = {"name": (str,), "kind": (str,), "d_in": (int, type(None)),
            "d_out": (int, type(None)), "has_bias": (bool,), "numel": (int,)}
    if not isinstance(v, list) or not all(
            isinstance(d, dict) and all(isinstance(d.get(k), t) for k, t in keys.items())
            for d in v):
        raise Bad("must be a list of {name, kind, d_in, d_out, has_bias, numel} objects")
    return tuple(MappingProxyType(d) for d in v)


def _spec(v) -> str:
    try:
        parse_compression(_str(v))
    except CompressError as e:
        raise Bad(f"is not a compression spec ({e})") from None
    return v


def _index_kind(v) -> str:
    try:
        parse_index_spec(_str(v))
    except (FaissIndexError, ValueError) as e:
        raise Bad(f"is not an index spec ({e})") from None
    return v


def _hessian(v) -> str:
    if v not in HESSIANS:
        raise Bad(f"must be one of {', '.join(HESSIANS)}, got {v!r}")
    return v


def _damping(v):
    if v is not None:
        try:
            parse_damping(_str(v))
        except PreconditionError as e:
            raise Bad(f"is not a damping ({e})") from None
    return v


def _key(v) -> str:
    if not isinstance(v, str) or not KEY.match(v):
        raise Bad(f"must be 12 hex digits, got {v!r:.40}")
    return v


def _per_layer(v) -> Mapping[str, float]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise Bad("must be an object of layer name -> number")
    return MappingProxyType({k: _finite(x) for k, x in v.items()})


def _recall(v) -> Mapping | None:
    """index.recall: {k, recall in [0, 1], queries, ...} or absent."""
    if v is None:
        return None
    d = _dict(v)
    _int(d.get("k"), 0), _fraction(d.get("recall")), _int(d.get("queries"), 0)
    return d


def _index(v) -> Mapping:
    d = _dict(v)
    try:
        _recall(d.get("recall"))
    except Bad as e:
        raise Bad(f"recall {e}") from None
    return d


def _tune(v) -> Mapping | None:
    """The `tune` record (grass_index.eval.tune.TuneResult.record): its choice and its grid."""
    if v is None:
        return None
    d = _dict(v)
    choice = d.get("choice")
    if not isinstance(choice, dict):
        raise Bad("has no choice object")
    _str(choice.get("name")), _hessian(choice.get("hessian")), _damping(choice.get("damping"))
    grid = d.get("grid")
    if not isinstance(grid, list) or not all(isinstance(c, dict) for c in grid):
        raise Bad("grid must be a list of candidate objects")
    for c in [choice, *grid]:
        _str(c.get("name"))
        for k in ("val_lds", "heldout_lds"):
            _opt(_finite)(c.get(k))
    for k in ("n_val", "n_heldout", "n_subsets"):
        _int(d.get(k), 0)
    return d


# --- the records --------------------------------------------------------------------------------

def _field(check, *, required: bool = False, key: str | None = None):
    """A record field: its check, whether the file must hold it, its JSON key (default: the
    field's name)."""
    return field(default=None, metadata=dict(check=check, required=required, key=key))


def _fix() -> str:
    return (f"the index directory is damaged or was edited: run {repair_command()} to restore "
            "its records from the sketch store, or rebuild it")


def column_order(layout: Mapping[str, int], layer_dims, *, ensemble) -> dict[str, int]:
    """``layout`` in the order the sketch's columns hold its layers: the selected layers' order
    (``layer_dims``), checkpoint by checkpoint for an ensemble (keys ``c{c}/{layer}``).
    A record's JSON keys are sorted, which is another order as soon as a model has 10 layers
    of one kind; slicing columns by it would apply one layer's preconditioner to another's."""
    position = {d["name"]: i for i, d in enumerate(layer_dims)}

    def place(name: str) -> tuple[int, int]:
        m = BLOCK.match(name) if ensemble is not None else None
        checkpoint, layer = (int(m.group(1)), name[m.end():]) if m else (0, name)
        if layer not in position:
            raise Bad(f"field 'layout' names {name!r}, a layer 'layer_dims' does not list")
        return checkpoint, position[layer]

    return dict(sorted(layout.items(), key=lambda item: place(item[0])))


@dataclass(frozen=True, init=False, repr=False)
class BuildRecord:
    """build.json: what the raw sketches depend on (indexdir/record.py describes each key).
    ``BuildRecord(record_dict, source)`` checks every field and their agreement, and raises
    AttributionError naming ``source`` (the file) and the field otherwise."""

    format: int = _field(_int, required=True)
    sparsification: str = _field(_spec, required=True)
    projection: str = _field(_spec, required=True)
    seed: int = _field(lambda v: _int(v, -2**63, 2**64 - 1), required=True)
    layers: tuple[str, ...] | None = _field(_opt(_strings))
    layer_dims: tuple[Mapping, ...] = _field(_layer_dims, required=True)
    layout: Mapping[str, int] = _field(_layout, required=True)
    dim: int = _field(_positive, required=True)
    batch_size: int = _field(_positive, required=True)
    n_train: int = _field(_positive, required=True)
    model_hash: str = _field(_str, required=True)
    data_hash: str = _field(_opt(_str))
    sketch_fingerprint: str | None = _field(_opt(_str))
    left_out: Mapping | None = _field(_opt(_dict))
    # an ensemble's scores average over this many checkpoints (layout keys c{c}/{layer}, and
    # each one's model hash); recorded only for an ensemble, 1 otherwise
    checkpoints: int = _field(_opt(_positive))
    checkpoint_hashes: tuple[str, ...] | None = _field(_opt(_strings))
    selective_mask: str | None = _field(_opt(_str))  # the mask file's hash, when one was used
    raw: Mapping[str, Any] = field(default=None, repr=False, compare=False)

    def __init__(self, record: Mapping, source: str = "the build record"):
        if not isinstance(record, Mapping):
            raise AttributionError(f"{source} is not a JSON object; {_fix()}")
        for f in fields(self):
            if f.name == "raw":
                continue
            key = f.metadata["key"] or f.name
            try:
                if key not in record and f.metadata["required"]:
                    raise Bad("is missing")
                object.__setattr__(self, f.name, f.metadata["check"](record.get(key)))
            except Bad as e:
                raise AttributionError(f"{source}: field {key!r} {e}; {_fix()}") from None
        try:
            self._check_together()
            # JSON records are written with sorted keys, but the sketch concatenates layers in
            # model order (h.2 before h.10): every reader slices columns by this order
            layout = column_order(self.layout, self.layer_dims, ensemble=self.checkpoints)
        except Bad as e:
            raise AttributionError(f"{source}: {e}; {_fix()}") from None
        object.__setattr__(self, "layout", MappingProxyType(layout))
        object.__setattr__(self, "raw", MappingProxyType({**record, "layout": layout}))
        self._fill()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_train={self.n_train}, dim={self.dim}, ...)"

    def _fill(self) -> None:
        """Defaults of keys recorded only when they differ from them."""
        if self.checkpoints is None:
            object.__setattr__(self, "checkpoints", 1)

    def _check_together(self) -> None:
        if self.dim != sum(self.layout.values()):
            raise Bad(f"field 'dim' ({self.dim}) is not the sum of the layout's widths "
                      f"({sum(self.layout.values())})")
        if self.checkpoints is None:  # a single model (the key is only written for ensembles)
            return
        blocks = [BLOCK.match(name) for name in self.layout]
        seen = {int(m.group(1)) for m in blocks if m}
        if (not all(blocks) or seen != set(range(self.checkpoints))
                or len(self.checkpoint_hashes or ()) != self.checkpoints):
            raise Bad(f"field 'checkpoints' ({self.checkpoints}) does not match the layout's "
                      "blocks (c0/ .. c{C-1}/) and checkpoint_hashes")

    @property
    def n_batches(self) -> int:
        """Pass 1's batches (= store blocks)."""
        return batch_count(self.n_train, self.batch_size)


@dataclass(frozen=True, init=False, repr=False)
class IndexRecord(BuildRecord):
    """config.json: the build record plus what pass 2 did, the versions that wrote it and the
    hash over all of it but ``created`` (``IndexRecord(config_dict, source)``; readers get it
    from ``grass_index.indexdir.read_record``, checked against the store too)."""

    task: str | None = _field(_opt(_str))
    task_sha256: str | None = _field(_opt(_str))
    library: str = _field(_str, required=True)
    version: str | None = _field(_opt(_str))
    torch_version: str | None = _field(_opt(_str), key="torch")
    hessian: str = _field(_hessian, required=True)
    damping: str | None = _field(_damping)
    damping_used: Mapping[str, float] | None = _field(_opt(_per_layer))
    preconditioner: Mapping | None = _field(_opt(_dict))
    preconditioner_key: str = _field(_key, required=True)
    layers_described: Mapping | None = _field(_opt(_dict))
    capture: Mapping | None = _field(_opt(_dict))
    index: Mapping = _field(_index, required=True)
    index_kind: str = _field(_index_kind, required=True)
    # None when the exact vectors are the store's rows (index.held == "store": indexdir/scan.py)
    index_file: str | None = _field(_opt(_str))
    index_files: tuple[str, ...] | None = _field(_opt(_strings))
    n_blocks: int = _field(_positive, required=True)
    sketch_hash: str | None = _field(_opt(_str))
    item_signature: Any = _field(lambda v: v)
    created: str | None = _field(_opt(_str))
    config_hash: str = _field(_str, required=True)
    tune: Mapping | None = _field(_tune)
    # a living index's generation (indexdir/generations.py); absent: generation 0 of a build
    generation: Generation = _field(lambda v: v if v is None else _dict(v))

    def __init__(self, record: Mapping, source: str = "config.json"):
        super().__init__(record, source)

    def _fill(self) -> None:
        super()._fill()
        if self.index_files is None:  # older configs name one file
            object.__setattr__(self, "index_files",
                               () if self.index_file is None else (self.index_file,))
        for name in ("layers_described", "capture", "preconditioner"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, MappingProxyType({}))
        object.__setattr__(self, "damping_used", dict(self.damping_used or {}))

    def _check_together(self) -> None:
        super()._check_together()
        gen = self.generation
        try:
            gen = Generation.from_record(None if gen is None else dict(gen), self.n_train)
        except ValueError as e:
            raise Bad(f"field 'generation' {e}") from None
        object.__setattr__(self, "generation", gen)
        if self.n_blocks != self.n_batches:
            raise Bad(f"field 'n_blocks' ({self.n_blocks}) is not the batch count of n_train "
                      f"{self.n_train} in batches of {self.batch_size} ({self.n_batches})")
        if self.held_in_store != (not self.index_files) or (
                self.index_file is not None and not self.index_files):
            raise Bad("fields 'index_file(s)' must name the FAISS file(s) unless index.held "
                      "is 'store' (an exact index scanned from the sketch store), and only then "
                      "be empty")
        if self.index_files and self.index_file != self.index_files[0]:
            raise Bad("field 'index_file' is not the first of 'index_files'")
        if any(not name.startswith(f"index-{self.preconditioner_key}")
               for name in self.index_files):
            raise Bad("field 'index_files' names files of another variant than "
                      f"preconditioner_key {self.preconditioner_key}")

    def __repr__(self) -> str:
        return (f"IndexRecord(n_train={self.n_train}, dim={self.dim}, hessian={self.hessian}, "
                f"index_kind={self.index_kind})")

    @property
    def damping_setting(self) -> str:
        """The recorded damping in words (what `info` shows): "auto" is the spectrum rule (the
        default), a number × the mean eigenvalue, null (an index built before "auto" was the
        default) 0.3 × the mean eigenvalue."""
        from ..precondition.damping import LEGACY_DAMPING, parse_damping

        if self.hessian == "identity":
            return "none (identity)"
        if self.damping is None:
            return f"{LEGACY_DAMPING} × mean eigenvalue (recorded null: the default before auto)"
        mode, value = parse_damping(self.damping)
        if mode == "auto":
            return f"{self.damping} (λ = {value:g} × the eigenvalue at 99.95% of the trace)"
        return f"{self.damping} × mean eigenvalue" if mode == "relative" else str(self.damping)

    @property
    def removed(self) -> tuple[int, ...]:
        """The training ids removed from this index (never returned, not in the Fisher)."""
        return self.generation.removed

    @property
    def n_live(self) -> int:
        """The training examples that count: n_train less the removed ones."""
        return self.generation.n_live

    @property
    def held_in_store(self) -> bool:
        """The exact index is a scan of the store's rows (no FAISS file: indexdir/scan.py)."""
        return self.index.get("held") == "store"

    @property
    def recall(self) -> Mapping | None:
        """The measured recall of the FAISS index ({k, recall, queries, ...}), when recorded."""
        return self.index.get("recall")
