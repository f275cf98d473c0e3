"""Generations of a living index: every change to the training set (rows added at the end,
examples removed) is a new generation of the index directory, committed like a build — by
writing config.json last (docs/design.md, "Living index").

config.json's ``generation`` record: ``{"number": g, "added": [rows each generation added],
"removed": [training ids removed, sorted]}``; absent on a plain build (generation 0, every
row added by it, none removed), so older indexes keep their hashes. The sketch store keeps,
under ``generation/<g>``, the build record of every generation after 0 (a grown index has
another ``n_train`` and ``data_hash`` than the store was created with), written before the
generation's config.json: readers holding generation g compare config.json with the store's
record *of g*, never with a newer one still being written.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np


class BadGeneration(ValueError):
    """The generation record is out of its type or range (the message says how)."""


@dataclass(frozen=True)
class Generation:
    """One generation of an index: its number, the rows each generation added (the first is
    the build's), the training ids removed so far (sorted)."""

    number: int
    added: tuple[int, ...]
    removed: tuple[int, ...] = ()

    @classmethod
    def initial(cls, n_train: int) -> "Generation":
        return cls(0, (int(n_train),), ())

    @classmethod
    def from_record(cls, value, n_train: int) -> "Generation":
        """The typed record of config.json's ``generation`` (None: a plain build), checked
        against ``n_train``: raises BadGeneration naming what is wrong."""
        if value is None:
            return cls.initial(n_train)
        if not isinstance(value, dict) or set(value) != {"number", "added", "removed"}:
            raise BadGeneration("must be an object {number, added, removed}")
        number, added, removed = value["number"], value["added"], value["removed"]
        if not _int(number, 0):
            raise BadGeneration(f"number must be an integer >= 0, got {number!r}")
        if (not isinstance(added, list) or len(added) != number + 1
                or not all(_int(a, 0) for a in added) or not _int(added[0], 1)):
            raise BadGeneration(f"added must list the rows each of the {number + 1} "
                                "generations added (integers >= 0, the first >= 1)")
        if sum(added) != n_train:
            raise BadGeneration(f"added sums to {sum(added)}, not n_train ({n_train})")
        if (not isinstance(removed, list) or not all(_int(i, 0) for i in removed)
                or any(b <= a for a, b in zip(removed, removed[1:]))):
            raise BadGeneration("removed must be a sorted list of distinct training ids")
        if removed and removed[-1] >= n_train:
            raise BadGeneration(f"removed names id {removed[-1]}, outside 0..{n_train - 1}")
        if len(removed) >= n_train:
            raise BadGeneration("removes every training example")
        return cls(number, tuple(added), tuple(removed))

    def record(self) -> dict | None:
        """config.json's ``generation`` (None for generation 0: a plain build records none)."""
        if self.number == 0 and not self.removed:
            return None
        return dict(number=self.number, added=list(self.added), removed=list(self.removed))

    @property
    def tag(self):
        """What names this generation's rows (a cached Fisher records whose it is): 0 for a
        plain build, else a hash of the record (two removals of as many ids differ)."""
        rec = self.record()
        if rec is None:
            return 0
        return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def n_train(self) -> int:
        """Rows (training ids 0..n_train-1), removed ones included."""
        return sum(self.added)

    @property
    def n_live(self) -> int:
        """Rows that count: every training id but the removed ones."""
        return self.n_train - len(self.removed)

    def live_mask(self) -> np.ndarray:
        """bool [n_train]: True for an id that is not removed."""
        mask = np.ones(self.n_train, dtype=bool)
        mask[list(self.removed)] = False
        return mask

    def live_ids(self) -> np.ndarray:
        """The training ids that count, in order (int64)."""
        return np.flatnonzero(self.live_mask()).astype(np.int64)

    def grown(self, m: int) -> "Generation":
        """The next generation: ``m`` rows added at the end."""
        return Generation(self.number + 1, self.added + (int(m),), self.removed)

    def without(self, ids) -> "Generation":
        """The next generation: ``ids`` removed as well."""
        return Generation(self.number + 1, self.added + (0,),
                          tuple(sorted(set(self.removed) | {int(i) for i in ids})))


def _int(v, lo: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= lo


def store_key(number: int) -> str:
    """The sketch store's meta key of generation ``number``'s build record."""
    return f"generation/{number}"


def store_build(store, number: int) -> dict:
    """The build record of generation ``number`` as the sketch store keeps it: the creation
    record for generation 0 (and for a generation that did not change it)."""
    if number > 0:
        rec = store.get_meta(store_key(number), None)
        if isinstance(rec, dict):
            return rec
    return store.meta


def record_number(cfg) -> int:
    """The generation number a config dict names (0 when it has no usable record)."""
    gen = cfg.get("generation") if isinstance(cfg, dict) else None
    number = gen.get("number") if isinstance(gen, dict) else None
    return number if _int(number, 0) else 0
