"""The default exact index is the sketch store's own rows (grass_index/index/store_scan.py): no
FAISS copy on disk, the same answers as an exact FAISS file of preconditioned vectors, the
same rules (saturated blocks score 0, removed ids never returned, a damping that leaves
float32 refused), and `verify` checks and repairs what it keeps."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grass_index as gi
from grass_index.index.store_scan import StoreScan
from grass_index.indexdir.files import saturated_name
from grass_index.precondition import Preconditioner
from grass_index.store import SketchStore

N = 200  # n ≫ k: the dense inverses (2 × 32²) are 16% of the rows, so the store is scanned


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).eval()


def wide_model():
    """k = 1024 and 512 per layer: n = 40 ≪ k keeps the low-rank form (40×40 cores)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16)).eval()


WIDE = dict(sparsification="random_mask-32*32", projection="sjlt-1024", batch_size=16,
            progress=False)


def wide_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 32, generator=g),
                                          torch.randint(0, 16, (n,), generator=g))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 10, generator=g),
                                          torch.randint(0, 4, (n,), generator=g))


def loss(m, batch):
    x, y = batch
    return F.cross_entropy(m(x), y, reduction="none")


def build(out, **kw):
    kw = dict(dict(sparsification="random_mask-8*6", projection="sjlt-32", batch_size=8,
                   progress=False), **kw)
    return gi.build_index(model(), data(N, 1), loss, out, **kw)


@pytest.fixture(scope="module", params=["dense", "low_rank"])
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("scan")
    if request.param == "dense":
        return (build(d / "scan"), build(d / "faiss", index="flat:faiss"), model(),
                data(7, 2))
    m, train = wide_model(), wide_data(40, 1)
    return (gi.build_index(m, train, loss, d / "scan", **WIDE),
            gi.build_index(m, train, loss, d / "faiss", index="flat:faiss", **WIDE), m,
            wide_data(7, 2))


def test_the_default_exact_index_has_no_faiss_file_and_answers_like_one(pair):
    scan, faiss_idx, m, queries = pair
    assert scan.settings.held_in_store and not faiss_idx.settings.held_in_store
    assert not list(scan.path.glob("index-*")) and list(faiss_idx.path.glob("index-*.faiss"))
    assert isinstance(scan.vindex, StoreScan)
    forms = set(scan.config["preconditioner"]["forms"].values())
    assert forms == ({"dense"} if scan.n_train == N else {"low_rank"})
    q = scan.query_sketches(m, queries, loss)
    for opponents in (False, True):
        got = scan.search(q, 12, opponents=opponents)
        want = faiss_idx.search(q, 12, opponents=opponents)
        for g, w in zip(got, want):
            assert [i for i, _ in g] == [i for i, _ in w]
            np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-4,
                                       atol=1e-6 * max(abs(s) for _, s in w))
    # the full score matrix (preconditioned training rows) agrees with the scan's scores
    full = scan.score_sketches(q)
    top = scan.search(q, scan.n_train)
    for r, row in enumerate(top):
        np.testing.assert_allclose([s for _, s in row], full[r, [i for i, _ in row]].numpy(),
                                   rtol=1e-4, atol=1e-6 * float(full.abs().max()))
    assert scan.settings.recall["recall"] == 1.0


def dir_bytes(path: Path) -> int:
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512
               for d, _, files in os.walk(path) for f in files)


def test_on_disk_an_index_at_n_below_k_is_about_its_sketches(tmp_path):
    """n = 40 ≪ k (1024 and 512): the low-rank preconditioner is a 40×40 core per layer, and
    the exact index adds no copy: the directory is within 1.2× its sketches, plus LMDB's
    fixed pages; an exact FAISS file (flat:faiss) is a whole second copy."""
    wide, train = wide_model(), wide_data(40, 1)
    idx = gi.build_index(wide, train, loss, tmp_path / "idx", **WIDE)
    old = gi.build_index(wide, train, loss, tmp_path / "old", index="flat:faiss", **WIDE)
    assert set(idx.layout.values()) == {1024, 512}
    sketches = 40 * idx.dim * 4
    fixed = 128 << 10  # LMDB's meta, tree and freed pages; build.json, config.json, locks
    assert dir_bytes(idx.path) <= 1.2 * sketches + fixed
    assert dir_bytes(old.path) >= dir_bytes(idx.path) + 0.95 * sketches


def test_removed_examples_are_never_returned_by_the_scan(tmp_path):
    idx = build(tmp_path / "idx")
    q = idx.query_sketches(model(), data(3, 2), loss)
    first = [i for i, _ in idx.search(q, 5)[0]]
    idx.remove(first[:2])
    for opponents in (False, True):
        for row in idx.search(q, N, opponents=opponents):
            ids = [i for i, _ in row]
            assert len(ids) == N - 2 and not set(first[:2]) & set(ids)
    assert idx.search(q, 5)[0][0][0] == first[2]


def test_a_saturated_block_scores_exactly_zero_in_the_scan():
    """A block below 1e-30 (a saturated example) scores 0, the rest of its row as usual."""
    layout = {"a": 3, "b": 2}
    rows = np.array([[1.0, 2.0, -1.0, 0.5, 1.0],
                     [1e-38, 2e-38, 0.0, 3.0, -1.0],    # layer a saturated
                     [0.5, 0.5, 0.5, 1e-37, 0.0]], np.float32)  # layer b saturated

    identity = Preconditioner.fit({}, layout, hessian="identity")
    class Store:
        def scan_blocks(self, fn, *, limit=None, verify=True):
            fn(0, rows[:2])  # two blocks, as a store of batch size 2 holds them
            fn(2, rows[2:])

    from contextlib import nullcontext
    from grass_index.index.store_scan import saturated_blocks, starts_of
    pairs = saturated_blocks(rows, starts_of(layout))
    assert pairs.tolist() == [[1, 0], [2, 1]]
    scan = StoreScan(lambda: nullcontext(Store()), lambda: identity, dim=5,
                     live=np.ones(3, bool),
                     saturated=pairs, build_key="k")
    q = np.ones((1, 5), np.float32)
    scores, ids = scan.search(q, 3)
    got = dict(zip(ids[0].tolist(), scores[0].tolist()))
    assert got == {0: 3.5, 1: 2.0, 2: 1.5}
    # a saturated query block scores 0 too (its sketch is below 1e-30)
    q[0, :3] = 1e-38
    scores, ids = scan.search(q, 3)
    assert dict(zip(ids[0].tolist(), scores[0].tolist())) == {0: 1.5, 1: 2.0, 2: 0.0}


def test_a_query_the_damping_takes_out_of_float32_is_refused():
    from contextlib import nullcontext
    from grass_index.precondition.forms import Dense
    huge = Preconditioner({"a": 2}, "eFIM", {"a": Dense(np.eye(2, dtype=np.float32) * 1e30,
                                                        1e-30)},
                          {"a": 1e-30}, ("absolute", 1e-30))
    scan = StoreScan(lambda: nullcontext(None), lambda: huge, dim=2, live=np.ones(1, bool),
                     saturated=np.zeros((0, 2)), build_key="k")
    from grass_index.precondition import DampingError
    with pytest.raises(DampingError, match="overflowed float32.*larger damping") as e:
        scan.search(np.full((1, 2), 1e10, np.float32), 1)
    assert e.value.needs == "larger"


def test_verify_checks_and_repairs_the_saturated_list(tmp_path):
    idx = build(tmp_path / "idx")
    key = idx.settings.preconditioner_key
    assert gi.verify_index(idx.path)["ok"]
    with SketchStore.open(idx.path / "sketches", readonly=False) as st:
        st.put_array(saturated_name(key), np.array([[0, 0]], np.int64))  # a false entry
    rep = gi.verify_index(idx.path)
    assert not rep["ok"] and "disagrees" in str(rep)
    with SketchStore.open(idx.path / "sketches", readonly=False) as st:
        st.delete_array(saturated_name(key))
    with pytest.raises(gi.AttributionError, match="saturated blocks.*verify"):
        gi.open_index(idx.path).search(torch.ones(1, idx.dim), 3)
    assert gi.verify_index(idx.path, repair=True)["ok"]
    assert len(gi.open_index(idx.path).search(torch.ones(1, idx.dim), 3)[0]) == 3


def test_a_search_sketch_holds_the_raw_rows_and_ranks_like_exact_search(tmp_path):
    """A two-stage index (FAISS over a search sketch, re-ranked exactly) takes the rows raw:
    FAISS holds S·ĝ, a query searches with S·(F+λI)⁻¹q and re-ranks against the raw rows.
    Its answers are the exact index's; `verify` compares FAISS with the sketched raw rows."""
    from grass_index.indexdir.stored import load_faiss
    from grass_index.index import SearchSketch

    exact = build(tmp_path / "exact", index="flat:faiss")
    sk = build(tmp_path / "sketch", index="flat:sketch=32,rerank=50")
    assert sk.config["index"]["raw_rows"] and sk.config["index"]["search_sketch"]["dim"] == 32
    assert sk.settings.recall["recall"] >= 0.95
    q = sk.query_sketches(model(), data(7, 2), loss)
    for opponents in (False, True):
        for a, b in zip(sk.search(q, 5, opponents=opponents),
                        exact.search(q, 5, opponents=opponents)):
            assert [i for i, _ in a] == [i for i, _ in b]
            np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-4,
                                       atol=1e-6 * max(abs(s) for _, s in b))
    # FAISS holds the search sketch of the raw rows (no inverse applied to them)
    vindex = load_faiss(sk.path, sk.settings)
    with SketchStore.open(sk.path / "sketches") as st:
        raw = st.get_rows(np.arange(N))
    S = SearchSketch(sk.dim, 32, sk.settings.seed)
    np.testing.assert_allclose(vindex.inner.reconstruct(np.arange(N)), S(raw), rtol=1e-6,
                               atol=1e-7)
    assert gi.verify_index(sk.path)["ok"]
    # a refit writes the same raw sketches again: only the preconditioner changed
    before = vindex.inner.reconstruct(np.arange(N))
    sk.reprecondition(damping=1.0)
    after = load_faiss(sk.path, sk.settings).inner.reconstruct(np.arange(N))
    np.testing.assert_array_equal(before, after)
    assert gi.verify_index(sk.path)["ok"]


def test_near_n_equals_k_the_default_keeps_a_faiss_copy_and_scan_forces_the_scan(tmp_path):
    """n = 40 rows for two 32-wide dense layers: the inverses (8 KB) are 80% of the rows
    (10 KB), which a scan would read per query on top of them: the default writes the FAISS
    copy (one read per query); ``flat:scan`` scans anyway, with the same answers."""
    train = data(40, 1)
    near = gi.build_index(model(), train, loss, tmp_path / "near", sparsification="random_mask-8*6",
                          projection="sjlt-32", batch_size=8, progress=False)
    forced = gi.build_index(model(), train, loss, tmp_path / "scan", index="flat:scan",
                            sparsification="random_mask-8*6", projection="sjlt-32", batch_size=8,
                            progress=False)
    assert not near.settings.held_in_store and forced.settings.held_in_store
    assert forced.settings.index_kind == "flat:scan"
    q = near.query_sketches(model(), data(5, 2), loss)
    for a, b in zip(forced.search(q, 10), near.search(q, 10)):
        assert [i for i, _ in a] == [i for i, _ in b]
    with pytest.raises(gi.AttributionError, match="goes with flat alone"):
        gi.build_index(model(), train, loss, tmp_path / "bad", index="ivf:scan", progress=False)


def test_a_search_racing_a_reprecondition_answers_from_the_new_files(tmp_path, monkeypatch):
    """A scan preconditions every query, so re-preconditions in another process that delete
    the old arrays between the check and the read (twice in a row here) must not fail the
    search: it is retried as a whole on each new config (before: a bare KeyError; then, with
    one retry, the second race failed it — as CI's racing test did under load)."""
    import subprocess
    import sys

    import grass_index.query.querying as querying

    idx = build(tmp_path / "idx")
    assert idx.settings.held_in_store
    q = idx.query_sketches(model(), data(3, 2), loss)
    real, raced = querying.load_stored_preconditioner, []

    def racing(store, key, *a, **kw):
        if len(raced) < 2:  # the other process commits a refit right between check and read,
            raced.append(key)  # twice in a row (it keeps re-preconditioning)
            subprocess.run([sys.executable, "-c", "import sys, grass_index as gi; "
                            "gi.open_index(sys.argv[1]).reprecondition(damping=float("
                            "sys.argv[2]))", str(idx.path), ("0.5", "1.0")[len(raced) - 1]],
                           check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        return real(store, key, *a, **kw)
    monkeypatch.setattr(querying, "load_stored_preconditioner", racing)
    got = idx.search(q, 5)
    assert len(raced) == 2 and len(got) == 3 and all(len(r) == 5 for r in got)
    assert idx.settings.damping == "1.0" and idx.settings.preconditioner_key not in raced
    fresh = gi.open_index(idx.path).search(q, 5)
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in fresh]
