"""Streaming pass 2: float32-GEMM Fisher sums vs float64, chunking that never changes the sums,
in-place fitting (Cholesky and the low-rank Woodbury form), and large arrays as .npy files."""
import tracemalloc

import numpy as np
import pytest

from grass_index.precondition import ChunkedFisher, FisherAccumulator, Preconditioner
from grass_index.precondition.preconditioner import _inverse_in_place, uses_low_rank
from grass_index.store import SketchStore, StoreError
from grass_index.store import arrays as store_arrays


def test_float32_gemms_into_float64_stay_close_to_float64_over_120k_rows():
    rng = np.random.default_rng(0)
    k, n = 24, 120_000
    scale = np.logspace(-2, 2, k).astype(np.float32)  # columns of very different sizes
    G = (rng.standard_normal((n, k)).astype(np.float32) + 0.5) * scale
    acc = FisherAccumulator({"a": k})
    for lo in range(0, n, 10_000):
        acc.update(G[lo: lo + 10_000])
    G64 = G.astype(np.float64)
    want = G64.T @ G64 / n
    err = np.abs(acc.fisher("a") - want) / np.sqrt(np.outer(np.diag(want), np.diag(want)))
    assert err.max() < 2e-6  # float32 rounding of one chunk's sum, not of 120k additions


def test_chunked_fisher_sums_do_not_depend_on_how_rows_arrive():
    rng = np.random.default_rng(1)
    layout = {"a": 5, "b": 7}
    G = rng.standard_normal((1000, 12)).astype(np.float32)
    sums = []
    for cuts in ([1000], [8] * 125, [3, 997], [500, 1, 499]):
        c = ChunkedFisher(layout)
        c.chunk_rows = 64
        start = 0
        for size in cuts:
            c.add(start, G[start: start + size])
            start += size
        acc = c.finish()
        sums.append({k: acc.take_sum(k) for k in layout})
    for other in sums[1:]:
        for k in layout:
            assert np.array_equal(sums[0][k], other[k])  # bit-identical
    with pytest.raises(ValueError, match="id order"):
        ChunkedFisher(layout).add(5, G[:2])


@pytest.mark.parametrize("damping", [None, "abs:0.5"])
def test_low_rank_woodbury_equals_dense_cholesky(damping):
    rng = np.random.default_rng(2)
    layout = {"a": 40, "b": 30}
    n = 12
    assert uses_low_rank(n, 40) and uses_low_rank(29, 30) and not uses_low_rank(30, 30)
    G = rng.standard_normal((n, 70)).astype(np.float32)
    acc = FisherAccumulator(layout)
    acc.update(G)
    dense = Preconditioner.fit(acc.fishers(), layout, damping=damping)
    low = Preconditioner.fit_layers(layout, damping=damping, n=n, rows=lambda: G)
    for name in layout:
        assert low.damping_used[name] == pytest.approx(dense.damping_used[name], rel=1e-5)
        assert low.forms[name].kind == "low_rank" and dense.forms[name].kind == "dense"
        assert low.forms[name].core.shape == (n, n)  # never a k×k matrix
        want = dense.forms[name].inverse
        np.testing.assert_allclose(low.dense(name), want, rtol=1e-4,
                                   atol=1e-5 * np.abs(want).max())
        assert low.apply_layer(name, G[:, :layout[name]] if name == "a" else G[:, 40:]).dtype \
            == np.float32


def test_inverse_in_place_makes_no_float64_copy():
    rng = np.random.default_rng(3)
    k = 384
    X = rng.standard_normal((2 * k, k))
    A = X.T @ X / (2 * k)
    want = np.linalg.inv(A + 0.3 * np.trace(A) / k * np.eye(k))
    tracemalloc.start()
    inv, _ = _inverse_in_place("a", A, "relative", 0.3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4.5 * k * k * 4  # float32 result and float32 temps; a float64 copy is 8k²
    np.testing.assert_allclose(inv, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())


def test_large_arrays_are_checksummed_files_and_orphans_go(tmp_path, monkeypatch):
    monkeypatch.setattr(store_arrays, "FILE_BYTES", 1000)
    big = np.arange(5000, dtype=np.float64).reshape(50, 100)
    with SketchStore.create(tmp_path / "s", dim=4, meta={}) as st:
        st.put_array("big", big)
        st.put_array("small", np.arange(3.0))
        files = list((tmp_path / "s" / "arrays").iterdir())
        assert len(files) == 1 and files[0].suffix == ".npy"
        assert np.array_equal(st.get_array("big"), big)
        st.put_array("big", big + 1)  # replaced: the old file is gone
        assert len(list((tmp_path / "s" / "arrays").iterdir())) == 1
        assert np.array_equal(st.get_array("big"), big + 1)
    f = next((tmp_path / "s" / "arrays").iterdir())
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    (tmp_path / "s" / "arrays" / "deadbeef.npy.tmp").write_bytes(b"half-written")
    with SketchStore.open(tmp_path / "s", readonly=False) as st:  # a writer collects orphans
        assert not (tmp_path / "s" / "arrays" / "deadbeef.npy.tmp").exists()
        with pytest.raises(StoreError, match="corrupted"):
            st.get_array("big")
        assert any("corrupted" in p for p in st.verify())
        assert st.delete_array("big") and not list((tmp_path / "s" / "arrays").iterdir())


def test_mapped_arrays_are_checked_cheaply_on_open(tmp_path, monkeypatch):
    """A query maps a large array instead of reading and checksumming it: a truncated or
    re-shaped file is refused on open; a flipped data byte is left to the full checksum."""
    monkeypatch.setattr(store_arrays, "FILE_BYTES", 1000)
    big = np.arange(5000, dtype=np.float32).reshape(50, 100)
    with SketchStore.create(tmp_path / "s", dim=4, meta={}) as st:
        st.put_array("big", big)
        st.put_array("small", np.arange(3.0))
        got = st.get_array("big", mapped=True)
        assert isinstance(got, np.memmap) and not got.flags.writeable
        assert np.array_equal(got, big) and np.array_equal(st.get_array("small", mapped=True),
                                                            np.arange(3.0))
    f = next((tmp_path / "s" / "arrays").iterdir())
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with SketchStore.open(tmp_path / "s") as st:
        assert st.get_array("big", mapped=True).shape == (50, 100)  # cheap: not checksummed
        with pytest.raises(StoreError, match="corrupted"):
            st.get_array("big")  # the full read (verify, pass 2) is
    f.write_bytes(bytes(raw[:-8]))  # truncated
    with SketchStore.open(tmp_path / "s") as st, pytest.raises(StoreError, match="record|unread"):
        st.get_array("big", mapped=True)
    np.save(f, big.reshape(100, 50))  # another shape, same size
    with SketchStore.open(tmp_path / "s") as st, pytest.raises(StoreError, match="record"):
        st.get_array("big", mapped=True)
