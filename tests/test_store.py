"""SketchStore: round-trips, resume semantics, validation, arrays, corruption and map growth."""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from grass_index.store import SketchStore, StoreError, WriterLockedError
from grass_index.store import _env, arrays

DIM = 16
META = {"spec": "sjlt-16", "seed": 3, "layers": ["a", "b"]}


def rows(b, n=4, dim=DIM):
    return np.random.default_rng(b).standard_normal((n, dim)).astype(np.float32)


def fill(path, sizes, dim=DIM):
    s = SketchStore.create(path, dim=dim, meta=META)
    start = 0
    for b, n in enumerate(sizes):
        s.put_block(b, start, rows(b, n, dim))
        start += n
    return s


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12), data=st.data())
def test_roundtrip_blocks_and_rows(tmp_path_factory, sizes, data):
    path = str(tmp_path_factory.mktemp("s") / "store")
    expect = np.concatenate([rows(b, n) for b, n in enumerate(sizes)])
    with fill(path, sizes) as s:
        assert (s.committed_blocks, s.num_rows) == (len(sizes), len(expect))
    with SketchStore.open(path) as r:
        got = list(r.iter_blocks())
        assert [g[0] for g in got] == list(np.cumsum([0] + sizes[:-1]))
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), expect)
        start = data.draw(st.integers(0, len(sizes)))
        assert len(list(r.iter_blocks(start))) == len(sizes) - start
        ids = data.draw(st.lists(st.integers(0, len(expect) - 1), max_size=30))
        np.testing.assert_array_equal(r.get_rows(ids), expect[ids])  # any order, duplicates
        assert r.get_rows([]).shape == (0, DIM)
        assert r.meta == META and r.dim == DIM and r.verify() == []
        # scan_blocks: the same rows as views into the map, in order, cut at ``limit``
        seen = []
        r.scan_blocks(lambda s0, v: seen.append((s0, v.copy(), v.flags.writeable)))
        assert [x[0] for x in seen] == [g[0] for g in got] and not any(x[2] for x in seen)
        np.testing.assert_array_equal(np.concatenate([x[1] for x in seen]), expect)
        limit = data.draw(st.integers(0, len(expect)))
        cut = []
        r.scan_blocks(lambda s0, v: cut.append(v.copy()), limit=limit)
        got_cut = np.concatenate(cut) if cut else np.zeros((0, DIM), np.float32)
        np.testing.assert_array_equal(got_cut, expect[:limit])


def test_create_resumes_identical_meta_and_refuses_different(tmp_path):
    path = str(tmp_path / "s")
    fill(path, [3, 3]).close()
    with SketchStore.create(path, dim=DIM, meta=dict(META)) as s:  # identical: resume
        assert s.committed_blocks == 2 and s.num_rows == 6
    with pytest.raises(StoreError, match=r"seed: stored 3, requested 4"):
        SketchStore.create(path, dim=DIM, meta={**META, "seed": 4})
    with pytest.raises(StoreError, match=r"dim: stored 16, requested 8"):
        SketchStore.create(path, dim=8, meta=META)
    with pytest.raises(StoreError, match=r"extra: stored <absent>"):
        SketchStore.create(path, dim=DIM, meta={**META, "extra": 1})
    with SketchStore.open(path) as s:  # refusals changed nothing
        assert s.num_rows == 6


def test_put_block_rules(tmp_path):
    with fill(str(tmp_path / "s"), [4, 4]) as s:
        s.put_block(1, 4, rows(1))  # identical re-put: no-op
        assert s.committed_blocks == 2
        with pytest.raises(StoreError, match="already committed with different contents"):
            s.put_block(1, 4, rows(7))
        with pytest.raises(StoreError, match="next one is block 2, not 3"):
            s.put_block(3, 8, rows(3))
        with pytest.raises(StoreError, match="start_id=8"):
            s.put_block(2, 9, rows(2))
        with pytest.raises(StoreError, match="float32"):
            s.put_block(2, 8, rows(2).astype(np.float64))
        with pytest.raises(StoreError, match=r"shape \(b >= 1, dim=16\)"):
            s.put_block(2, 8, rows(2, dim=5))
        bad = rows(2)
        bad[2, 3] = np.nan
        with pytest.raises(StoreError, match=r"training ids \[10\] contain NaN"):
            s.put_block(2, 8, bad)
        with pytest.raises(StoreError, match="non-negative integer"):
            s.put_block(-1, 8, rows(2))
        with pytest.raises(IndexError, match="out of range"):
            s.get_rows([8])
        assert s.committed_blocks == 2 and s.num_rows == 8


def test_readonly_and_closed(tmp_path):
    path = str(tmp_path / "s")
    fill(path, [2]).close()
    with SketchStore.open(path) as r:
        with pytest.raises(StoreError, match="read-only"):
            r.put_block(1, 2, rows(1, 2))
        with pytest.raises(StoreError, match="read-only"):
            r.put_meta("status", "x")
    r.close()
    with pytest.raises(StoreError, match="closed"):
        r.num_rows


def test_same_process_sharing(tmp_path):
    path = str(tmp_path / "s")
    with fill(path, [2]) as w:
        with SketchStore.open(path) as r:  # reader alongside the writer in one process
            w.put_block(1, 2, rows(1, 2))
            assert r.num_rows == 4
        with pytest.raises(WriterLockedError, match=f"pid {os.getpid()}"):
            SketchStore.open(path, readonly=False)


def test_arrays_roundtrip_replace_and_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 1000)  # force many chunks
    with fill(str(tmp_path / "s"), [1]) as s:
        cases = {"f64": np.random.default_rng(0).standard_normal((37, 41)),
                 "i32": np.arange(12, dtype=np.int32).reshape(2, 3, 2),
                 "f16be": np.arange(5, dtype=">f2"), "scalar": np.float64(2.5),
                 "empty": np.zeros((0, 3), np.float32), "fortran": np.asfortranarray(np.eye(3))}
        for k, v in cases.items():
            s.put_array(k, v)
        for k, v in cases.items():
            got = s.get_array(k)
            assert got.dtype == np.asarray(v).dtype and got.shape == np.shape(v)
            np.testing.assert_array_equal(got, v)
        s.put_array("f64", np.ones(3))  # replace: old chunks dropped
        np.testing.assert_array_equal(s.get_array("f64"), np.ones(3))
        assert s.has_array("f64") and not s.has_array("nope")
        with pytest.raises(KeyError, match="no array named 'nope'"):
            s.get_array("nope")
        with pytest.raises(StoreError, match="numeric"):
            s.put_array("obj", np.array([object()]))
        s.put_meta("status", "cached")
        s.put_meta("damping", {"l1": 0.1})
        assert s.get_meta("status") == "cached" and s.get_meta("missing", 7) == 7
        with pytest.raises(StoreError, match="JSON"):
            s.put_meta("bad", float("nan"))
        h = s._h
        n_chunks = h.read(lambda t: t.stat(h.dbs["chunks"])["entries"])
        assert n_chunks == sum(-(-np.asarray(v).nbytes // 1000) for k, v in cases.items()
                               if k != "f64") + 1


def test_interrupted_put_array_is_invisible_and_collected(tmp_path, monkeypatch):
    path = str(tmp_path / "s")
    with fill(path, [1]) as s:
        s.put_array("F", np.zeros(10))
        real = _env.EnvHandle.write
        calls = []

        def failing(self, fn, **kw):  # let the chunk writes through, fail the final switch
            calls.append(1)
            if len(calls) == 3:
                raise StoreError("simulated crash before the switch")
            return real(self, fn, **kw)
        monkeypatch.setattr(arrays, "CHUNK_BYTES", 48)
        monkeypatch.setattr(_env.EnvHandle, "write", failing)
        with pytest.raises(StoreError, match="simulated"):
            s.put_array("F", np.ones(10))
        monkeypatch.setattr(_env.EnvHandle, "write", real)
        np.testing.assert_array_equal(s.get_array("F"), np.zeros(10))  # old one intact
    with SketchStore.open(path, readonly=False) as s:  # writer open removes the orphans
        h = s._h
        assert h.read(lambda t: t.stat(h.dbs["chunks"])["entries"]) == 1


def test_map_grows_automatically(tmp_path, monkeypatch):
    monkeypatch.setattr(_env, "INITIAL_MAP_SIZE", 256 * 1024)
    path = str(tmp_path / "s")
    with fill(path, [64] * 40, dim=256) as s:  # ~2.6 MB of rows into a 256 KiB map
        assert s.describe()["map_size"] > 256 * 1024
        s.put_array("big", np.ones(300_000))
    with SketchStore.open(path) as r:
        assert r.num_rows == 64 * 40 and r.verify() == []
        np.testing.assert_array_equal(r.get_rows([2559])[0], rows(39, 64, 256)[63])


def test_missing_truncated_and_corrupted(tmp_path):
    with pytest.raises(StoreError, match="directory does not exist"):
        SketchStore.open(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(StoreError, match="no data.mdb"):
        SketchStore.open(str(tmp_path / "empty"))
    garbage = tmp_path / "garbage"
    os.makedirs(garbage)
    (garbage / "data.mdb").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(StoreError, match="not a valid LMDB|corrupted"):
        SketchStore.open(str(garbage))

    path = tmp_path / "s"
    fill(str(path), [50] * 4, dim=256).close()
    data = path / "data.mdb"
    blob = bytearray(data.read_bytes())
    # flip one float inside block 2's rows (its bytes are unique, so we can find them)
    needle = rows(2, 50, 256)[10].tobytes()
    at = blob.find(needle)
    assert at > 0
    blob[at + 5] ^= 0xFF
    data.write_bytes(bytes(blob))
    with SketchStore.open(str(path)) as r:
        with pytest.raises(StoreError, match="block 2 failed its checksum"):
            list(r.iter_blocks())
        assert any("block 2" in p for p in r.verify())
        np.testing.assert_array_equal(r.get_rows([0, 199]), np.stack(
            [rows(0, 50, 256)[0], rows(3, 50, 256)[49]]))  # other blocks still readable
    data.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(StoreError, match="truncated"):
        SketchStore.open(str(path))
    data.write_bytes(bytes(blob[:100]))
    with pytest.raises(StoreError, match="truncated"):
        SketchStore.open(str(path))


def test_disk_efficiency_blocks_vs_rows(tmp_path):
    """Blocks of rows stay within ~1% of the raw float32 size at dim 4096 (not the 2x of
    one-row-per-value storage with 4 KiB pages)."""
    with fill(str(tmp_path / "s"), [32] * 8, dim=4096) as s:
        d = s.describe()
    assert d["disk_bytes"] / d["raw_row_bytes"] < 1.03


def test_delete_array_removes_header_and_chunks(tmp_path):
    """A deleted array is gone for readers and its chunks are freed (no orphans left)."""
    with SketchStore.create(tmp_path / "s", dim=4, meta={"m": 1}) as store:
        store.put_array("a", np.arange(10.0))
        store.put_array("b", np.ones((3, 3)))
        assert store.delete_array("a") is True
        assert store.delete_array("a") is False
        assert not store.has_array("a") and store.has_array("b")
        assert store.array_names() == ["b"]
        assert store.verify() == []
        with pytest.raises(KeyError, match="no array named 'a'"):
            store.get_array("a")
