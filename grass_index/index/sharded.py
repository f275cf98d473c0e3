"""An index kept as several FAISS files (parts) and searched as one through faiss.IndexShards.

Why parts: no single file or in-memory copy has to hold the whole corpus (each part loads or
maps on its own), and the parts are searched in parallel threads, FAISS merging their top-k.
Parts hold disjoint training ids and are made by :meth:`VectorIndex.empty_like` of the first,
so they share what makes their scores comparable: the trained IVF quantizer and the float16
column scales (queries are rescaled once, before the parts see them).
"""
from __future__ import annotations

import faiss
import numpy as np

from ._file import FaissIndexError
from .vector_index import VectorIndex, _same, _same_centroids


def part_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous id ranges [lo, hi) of ``parts`` near-equal parts of ids 0..n-1."""
    if parts < 1 or parts > max(n, 1):
        raise FaissIndexError(f"cannot split {n} vectors into {parts} parts; use 1..{max(n, 1)}")
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class ShardedIndex(VectorIndex):
    """Read-only search over ``parts`` (VectorIndex objects built with shared scales)."""

    def __init__(self, parts: list[VectorIndex]):
        if not parts:
            raise FaissIndexError("a sharded index needs at least one part")
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            same = (p.kind, p.dim, p.dtype, p.nlist) == (first.kind, first.dim, first.dtype,
                                                         first.nlist)
            if not (same and _same(p.exponents, first.exponents)
                    and _same_centroids(p, first)):
                raise FaissIndexError(f"index part {i} was not built like part 0 (kind, dim, "
                                      "dtype, nlist, float16 scales or IVF centroids differ); "
                                      "rebuild the index")
        shards = faiss.IndexShards(first.dim, True, False)  # threaded; parts carry their own ids
        for p in parts:
            shards.add_shard(p._index)
        super().__init__(shards, kind=first.kind, dim=first.dim, nlist=first.nlist,
                         nprobe=first.nprobe, readonly=True, dtype=first.dtype,
                         exponents=first.exponents, recall=first.recall,
                         build_key=first.build_key)
        self.parts = parts  # IndexShards does not own its sub-indexes: keep them alive

    def add(self, vectors, ids) -> None:
        raise FaissIndexError("a sharded index is read-only; add vectors to its parts")

    def reconstruct(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), np.float32)
        found = np.zeros(len(ids), bool)
        for p in self.parts:
            have = np.isin(ids, p.ids()) & ~found
            if have.any():
                out[have] = p.reconstruct(ids[have])
                found |= have
        if not found.all():
            raise KeyError(f"id {int(ids[~found][0])} is not in the index")
        return out

    def ids(self) -> np.ndarray:
        return np.concatenate([p.ids() for p in self.parts])

    def describe(self) -> dict:
        return dict(super().describe(), parts=len(self.parts))

    def save(self, path) -> None:
        raise FaissIndexError("save each part of a sharded index on its own")

