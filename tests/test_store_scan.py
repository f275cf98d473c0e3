"""The default exact index is the sketch store's own rows (grass_index/indexdir/scan.py): no
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
from grass_index.indexdir.scan import StoreScan, saturated_name
from grass_index.store import SketchStore

N = 60


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).eval()


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


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("scan")
    return build(d / "scan"), build(d / "faiss", index="flat:faiss")


def test_the_default_exact_index_has_no_faiss_file_and_answers_like_one(pair):
    scan, faiss_idx = pair
    assert scan.settings.held_in_store and not faiss_idx.settings.held_in_store
    assert not list(scan.path.glob("index-*")) and list(faiss_idx.path.glob("index-*.faiss"))
    assert isinstance(scan.vindex, StoreScan)
    q = scan.query_sketches(model(), data(7, 2), loss)
    for opponents in (False, True):
        got = scan.search(q, 12, opponents=opponents)
        want = faiss_idx.search(q, 12, opponents=opponents)
        for g, w in zip(got, want):
            assert [i for i, _ in g] == [i for i, _ in w]
            np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-4,
                                       atol=1e-6 * max(abs(s) for _, s in w))
    # the full score matrix (preconditioned training rows) agrees with the scan's scores
    full = scan.score_sketches(q)
    top = scan.search(q, N)
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
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16)).eval()
    g = torch.Generator().manual_seed(1)
    train = torch.utils.data.TensorDataset(torch.randn(40, 32, generator=g),
                                           torch.randint(0, 16, (40,), generator=g))
    kw = dict(sparsification="random_mask-32*32", projection="sjlt-1024", batch_size=16,
              progress=False)
    idx = gi.build_index(wide, train, loss, tmp_path / "idx", **kw)
    old = gi.build_index(wide, train, loss, tmp_path / "old", index="flat:faiss", **kw)
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

    class Identity:
        layout, damping_used = {"a": 3, "b": 2}, {"a": 0.0, "b": 0.0}

        def apply(self, q):
            return np.array(q, dtype=np.float32)

    class Store:
        def iter_blocks(self, verify=True):
            yield 0, rows.copy()

    from contextlib import nullcontext
    from grass_index.indexdir.scan import saturated_blocks, starts_of
    pairs = saturated_blocks(rows, starts_of(layout))
    assert pairs.tolist() == [[1, 0], [2, 1]]
    scan = StoreScan(lambda: nullcontext(Store()), Identity, dim=5, live=np.ones(3, bool),
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
    class Huge:
        layout, damping_used = {"a": 2}, {"a": 1e-40}

        def apply(self, q):
            return np.asarray(q, np.float64) * 1e40

    from contextlib import nullcontext
    scan = StoreScan(lambda: nullcontext(None), Huge, dim=2, live=np.ones(1, bool),
                     saturated=np.zeros((0, 2)), build_key="k")
    with pytest.raises(gi.AttributionError, match="overflowed float32.*larger damping"):
        scan.search(np.ones((1, 2), np.float32), 1)


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
