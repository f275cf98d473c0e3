"""VectorIndex: exact top-k vs argsort, opponents, ids, persistence, IVF recall, bad files."""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from grass_index.index import FaissIndexError, VectorIndex, recall_at_k


def clustered(n, d, seed, centers=50):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 3
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, d))).astype(np.float32), c


def check_topk(scores, ids, exact, id_of, k, opponents):
    """ids are the exact top-k up to float ties; scores equal the exact scores of those ids."""
    order = np.argsort(exact if opponents else -exact, axis=1, kind="stable")[:, :k]
    ref_scores = np.take_along_axis(exact, order, 1)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)
    col = {int(t): j for j, t in enumerate(id_of)}
    got = np.array([[exact[q, col[int(t)]] for t in row] for q, row in enumerate(ids)])
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-4)
    same = (ids == id_of[order]).all(1)
    if not same.all():  # ids may differ only where two exact scores (nearly) tie
        gaps = np.abs(np.diff(np.sort(exact[~same], 1), axis=1)).min(1)
        assert (gaps < 1e-3).all()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 40), d=st.integers(1, 24), k=st.integers(1, 400),
       seed=st.integers(0, 2**16))
def test_flat_topk_equals_argsort_of_exact_scores(n, m, d, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((m, d)).astype(np.float32)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + 5  # arbitrary training ids
    idx = VectorIndex.create(d)
    idx.add(x[: n // 2], ids[: n // 2])  # several adds
    idx.add(np.asfortranarray(x[n // 2:]).astype(np.float64), ids[n // 2:])  # converted
    exact = q.astype(np.float64) @ x.T.astype(np.float64)
    kk = min(k, n)
    for opp in (False, True):
        s, i = idx.search(q, k, opponents=opp)
        assert s.shape == i.shape == (m, kk) and s.dtype == np.float32 and i.dtype == np.int64
        check_topk(s, i, exact, ids, kk, opp)
    np.testing.assert_array_equal(idx.reconstruct(ids[::7]), x[::7])


def test_bad_inputs():
    idx = VectorIndex.create(8)
    with pytest.raises(FaissIndexError, match=r"shape \(n, 8\)"):
        idx.add(np.zeros((2, 7), np.float32), [0, 1])
    with pytest.raises(FaissIndexError, match="unique"):
        idx.add(np.zeros((2, 8), np.float32), [3, 3])
    with pytest.raises(FaissIndexError, match="NaN"):
        idx.add(np.full((1, 8), np.nan, np.float32), [0])
    with pytest.raises(FaissIndexError, match="unknown index kind|unknown index"):
        VectorIndex.create(8, "hnsw")
    with pytest.raises(FaissIndexError, match="k must be a positive"):
        idx.search(np.zeros((1, 8), np.float32), 0)
    s, i = idx.search(np.zeros((3, 8), np.float32), 5)  # empty index: k clamps to 0
    assert s.shape == i.shape == (3, 0)
    with pytest.raises(KeyError, match="not in the index"):
        idx.reconstruct([1])
    ivf = VectorIndex.create(8, "ivf", nlist=4)
    assert ivf.needs_training
    with pytest.raises(FaissIndexError, match="trained first"):
        ivf.add(np.zeros((1, 8), np.float32), [0])


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_roundtrip(tmp_path, mmap):
    x, _ = clustered(3000, 32, 0)
    q, _ = clustered(50, 32, 1)
    ids = np.arange(3000, dtype=np.int64) * 2
    for kind, kw in (("flat", {}), ("ivf", {"nlist": 16})):
        idx = VectorIndex.create(32, kind, **kw)
        idx.train(x)
        idx.add(x, ids)
        path = str(tmp_path / f"{kind}.faiss")
        idx.save(path)
        back = VectorIndex.load(path, mmap=mmap)
        assert back.describe() == idx.describe()
        for opp in (False, True):
            s0, i0 = idx.search(q, 10, opponents=opp)
            s1, i1 = back.search(q, 10, opponents=opp)
            np.testing.assert_array_equal(i0, i1)
            np.testing.assert_array_equal(s0, s1)
        np.testing.assert_array_equal(back.reconstruct(ids[:5]), x[:5])
        assert sorted(back.ids().tolist()) == ids.tolist()
        if mmap:
            with pytest.raises(FaissIndexError, match="read-only"):
                back.add(x[:1], [99999])


def test_ivf_recall_on_clustered_data():
    x, c = clustered(20000, 64, 2, centers=100)
    q, _ = clustered(200, 64, 3, centers=100)
    ids = np.arange(len(x), dtype=np.int64)
    flat = VectorIndex.create(64)
    flat.add(x, ids)
    ivf = VectorIndex.create(64, "ivf")
    ivf.train(x[:8000])
    ivf.add(x, ids)
    assert ivf.nlist == 205 and ivf.nprobe == 26  # defaults: min(4*sqrt(n), n//39), nlist/8
    _, exact = flat.search(q, 10)
    r = {p: recall_at_k(ivf.search(q, 10, nprobe=p)[1], exact, 10) for p in (1, 4, ivf.nprobe)}
    # measured here: nprobe 1 -> 0.39, 4 -> 0.79, 8 -> 0.94, default 26 -> 0.994
    assert r[1] <= r[4] <= r[ivf.nprobe]
    assert r[ivf.nprobe] >= 0.98 and r[4] >= 0.7
    _, exact_o = flat.search(q, 10, opponents=True)
    assert recall_at_k(ivf.search(q, 10, opponents=True)[1], exact_o, 10) >= 0.9


def test_recall_at_k():
    assert recall_at_k([[1, 2, 3]], [[3, 2, 1]], 3) == 1.0
    assert recall_at_k([[1, -1], [5, 6]], [[1, 2], [7, 5]], 2) == 0.5
    with pytest.raises(ValueError):
        recall_at_k([[1]], [[1]], 2)


def test_corrupted_truncated_missing_files(tmp_path):
    idx = VectorIndex.create(16)
    idx.add(np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32),
            np.arange(500))
    path = tmp_path / "i.faiss"
    idx.save(str(path))
    good = path.read_bytes()
    with pytest.raises(FaissIndexError, match="no index file"):
        VectorIndex.load(str(tmp_path / "missing.faiss"))
    for bad, why in ((good[: len(good) // 2], "footer"), (good[:10], "only 10 bytes"),
                     (good[:100] + bytes([good[100] ^ 1]) + good[101:], "checksum"),
                     (b"x" * 5000, "footer")):
        path.write_bytes(bad)
        with pytest.raises(FaissIndexError, match=why):
            VectorIndex.load(str(path), mmap=True)


def test_save_is_atomic_and_never_torn(tmp_path, monkeypatch):
    """A save that dies mid-way leaves the previous file intact and no temp file behind."""
    path = str(tmp_path / "i.faiss")
    a = VectorIndex.create(4)
    a.add(np.eye(4, dtype=np.float32), np.arange(4))
    a.save(path)
    b = VectorIndex.create(4)
    b.add(np.ones((3, 4), np.float32), np.arange(3))
    import grass_index.index._file as f

    def boom(*args):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(f.os, "fsync", boom)
    with pytest.raises(FaissIndexError, match="previous file there is unchanged"):
        b.save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["i.faiss"]
    assert VectorIndex.load(path).ntotal == 4
    b.save(path)
    assert VectorIndex.load(path).ntotal == 3


def test_index_use_leaves_torch_thread_count_alone():
    """FAISS and torch share OpenMP: creating/searching an index must not reset the thread
    count a user chose with torch.set_num_threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vi = VectorIndex.create(8, "flat")
        vi.add(np.ones((4, 8), np.float32), np.arange(4))
        vi.search(np.ones((1, 8), np.float32), 2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- float16 storage ------------------------------------------------------------------------------

@pytest.mark.parametrize("magnitude", [1e-7, 1.0, 1e6, "mixed"])
def test_fp16_flat_scores_match_exact_at_any_magnitude(magnitude):
    """SQfp16 codes with power-of-two column scales: top-k and scores within float16 precision
    for vectors far below float16's normal range (1e-7), far above its maximum (1e6), and with
    columns 12 orders of magnitude apart (as preconditioned layers can be) whose products with
    the query all matter."""
    rng = np.random.default_rng(0)
    col = np.logspace(-6, 6, 48) if magnitude == "mixed" else np.full(48, magnitude)
    x = (rng.standard_normal((2000, 48)) * col).astype(np.float32)
    q = (rng.standard_normal((30, 48)) / (col if magnitude == "mixed" else 1)).astype(np.float32)
    magnitude = np.abs(x).max()
    ids = np.arange(2000, dtype=np.int64) + 7
    idx = VectorIndex.create(48, "flat", dtype="float16")
    idx.add(x[:1000], ids[:1000])
    idx.add(x[1000:], ids[1000:])
    assert idx.exponents.dtype == np.int32  # powers of two: the scaling itself is exact
    exact = q.astype(np.float64) @ x.T.astype(np.float64)
    for opp in (False, True):
        s, i = idx.search(q, 10, opponents=opp)
        got = np.take_along_axis(exact, i - 7, 1)
        ref = np.sort(exact, 1)[:, :10] if opp else -np.sort(-exact, 1)[:, :10]
        tol = 2e-3 * np.abs(exact).max()  # float16 keeps ~11 significant bits
        np.testing.assert_allclose(s, got, atol=tol)
        np.testing.assert_allclose(got, ref, atol=2 * tol)  # any swap is a near tie
    assert (np.abs(idx.reconstruct(ids[:5]) - x[:5]) <= 1e-3 * (np.abs(x[:5]) + col)).all()
    assert recall_at_k(idx.search(q, 10)[1], VectorIndex_exact(x, ids, q, 10), 10) >= 0.95


def VectorIndex_exact(x, ids, q, k):
    flat = VectorIndex.create(x.shape[1])
    flat.add(x, ids)
    return flat.search(q, k)[1]


def test_fp16_out_of_range_vectors_are_refused_not_stored_as_inf():
    idx = VectorIndex.create(4, dtype="float16")
    idx.add(np.ones((3, 4), np.float32), np.arange(3))  # scales fixed: 1 -> 2**3
    idx.add(np.full((1, 4), 8000.0, np.float32), [3])  # 8000x the first: 64000, still in range
    with pytest.raises(FaissIndexError, match="beyond float16's range.*below 2.*float32 index"):
        idx.add(np.full((1, 4), 8200.0, np.float32), [4])
    assert idx.ntotal == 4
    assert np.isfinite(idx.search(np.ones((1, 4), np.float32), 4)[0]).all()


@pytest.mark.parametrize("mmap", [False, True])
def test_fp16_indexes_roundtrip_and_halve_the_file(tmp_path, mmap):
    x, _ = clustered(4000, 64, 4)
    x *= 1e-5  # a scale that matters
    q, _ = clustered(40, 64, 5)
    ids = np.arange(4000, dtype=np.int64)
    sizes = {}
    for kind, dtype, kw in (("flat", "float32", {}), ("flat", "float16", {}),
                            ("ivf", "float16", {"nlist": 32, "nprobe": 32})):
        idx = VectorIndex.create(64, kind, dtype=dtype, **kw)
        idx.train(x)
        idx.add(x, ids)
        path = tmp_path / f"{kind}-{dtype}.faiss"
        idx.save(str(path))
        sizes[kind, dtype] = path.stat().st_size
        back = VectorIndex.load(str(path), mmap=mmap)
        assert back.describe() == idx.describe() and back.dtype == dtype
        for opp in (False, True):
            s0, i0 = idx.search(q, 10, opponents=opp)
            s1, i1 = back.search(q, 10, opponents=opp)
            np.testing.assert_array_equal(i0, i1)
            np.testing.assert_array_equal(s0, s1)
        # nprobe = nlist: IVF is exhaustive, so only float16 rounding separates it from exact
        assert recall_at_k(back.search(q, 10)[1], VectorIndex_exact(x, ids, q, 10), 10) >= 0.95
    assert sizes["flat", "float16"] < 0.55 * sizes["flat", "float32"]


def test_index_specs():
    from grass_index.index import parse_spec
    assert parse_spec("flat")[:3] == ("flat", "float32", 1)
    assert parse_spec("ivf:fp16")[:3] == ("ivf", "float16", 1)
    assert parse_spec("flat").sketch == -1 and parse_spec("flat:exact").sketch == 0
    assert str(parse_spec("flat:rerank=5,sketch=1024")) == "flat:sketch=1024,rerank=5"
    assert str(parse_spec("flat:shards=4,fp16")) == "flat:fp16,shards=4"  # canonical order
    assert str(parse_spec("ivf:shards=1")) == "ivf"
    for bad in ("hnsw", "flat:fp8", "IVF", "", "flat:", "flat:shards=0", "ivf:shards=x",
                "flat:sketch=x", "flat:rerank=0"):
        with pytest.raises(FaissIndexError, match="flat:fp16"):
            parse_spec(bad)


@pytest.mark.parametrize("kind,dtype", [("flat", "float32"), ("flat", "float16"),
                                        ("ivf", "float32"), ("ivf", "float16")])
def test_sharded_index_searches_its_parts_as_one(tmp_path, kind, dtype):
    """Parts made by empty_like (shared quantizer and float16 scales), each holding a
    contiguous id range, answer exactly as one index holding everything."""
    from grass_index.index import ShardedIndex, part_ranges

    assert part_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(FaissIndexError, match="into 11 parts"):
        part_ranges(10, 11)
    x, _ = clustered(3000, 32, 6)
    x *= np.logspace(-3, 3, 32, dtype=np.float32)
    q, _ = clustered(40, 32, 7)
    ids = np.arange(3000, dtype=np.int64)
    kw = {"nlist": 16, "nprobe": 16} if kind == "ivf" else {}
    whole = VectorIndex.create(32, kind, dtype=dtype, **kw)
    whole.train(x[:2000])
    whole.fix_scales(x[:2000])
    parts = [whole.empty_like() for _ in range(3)]
    for part, (lo, hi) in zip(parts, part_ranges(3000, 3)):
        part.add(x[lo:hi], ids[lo:hi])
        part.save(str(tmp_path / f"p{lo}.faiss"))
    whole.add(x, ids)
    loaded = [VectorIndex.load(str(tmp_path / f"p{lo}.faiss"), mmap=True)
              for lo, _ in part_ranges(3000, 3)]
    for sharded in (ShardedIndex(parts), ShardedIndex(loaded)):
        assert sharded.ntotal == 3000 and sharded.describe()["parts"] == 3
        for opp in (False, True):
            s0, i0 = whole.search(q, 10, opponents=opp)
            s1, i1 = sharded.search(q, 10, opponents=opp)
            np.testing.assert_array_equal(i0, i1)
            np.testing.assert_allclose(s0, s1, rtol=1e-6)
        np.testing.assert_array_equal(sharded.reconstruct([5, 1500, 2999]),
                                      whole.reconstruct([5, 1500, 2999]))
        assert sorted(sharded.ids().tolist()) == ids.tolist()
        with pytest.raises(FaissIndexError, match="read-only"):
            sharded.add(x[:1], [5000])
    other = VectorIndex.create(32, kind, dtype=dtype, **kw)  # its own scales / quantizer
    other.train(x[1000:])
    other.add(x[1000:] * 3, ids[1000:])
    if kind == "ivf" or dtype == "float16":
        with pytest.raises(FaissIndexError, match="not built like part 0"):
            ShardedIndex([parts[0], other])
    with pytest.raises(FaissIndexError, match="before adding"):
        parts[0].empty_like()


def test_recall_excluding_the_query_itself_and_streaming_ground_truth():
    from grass_index.index import ExactTopK
    # the query's own id (first) is dropped from both lists before comparing the top 2
    assert recall_at_k([[9, 1, 2]], [[9, 1, 3]], 2, exclude=[9]) == 0.5
    assert recall_at_k([[1, 9, 2]], [[9, 1, 2]], 2, exclude=[9]) == 1.0
    with pytest.raises(ValueError, match="excluded"):
        recall_at_k([[1, 2]], [[1, 2]], 2, exclude=[1])
    rng = np.random.default_rng(1)
    x, q = rng.standard_normal((1000, 16)), rng.standard_normal((7, 16))
    top = ExactTopK(q, 12)
    for lo in range(0, 1000, 64):  # chunks, as the builder streams them
        top.add(x[lo:lo + 64], np.arange(lo, min(lo + 64, 1000)) + 100)
    scores, ids = top.result()
    exact = q.astype(np.float32) @ x.astype(np.float32).T
    np.testing.assert_array_equal(ids, np.argsort(-exact, 1, kind="stable")[:, :12] + 100)
    np.testing.assert_allclose(scores, -np.sort(-exact, 1)[:, :12], rtol=1e-6)
