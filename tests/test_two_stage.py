"""Two-stage search (FAISS over a seeded search sketch, exact re-rank from the store) and the
build plan (estimate, refusal before pass 1)."""
import numpy as np
import pytest
import torch

import grass_index as gi
from grass_index import plan
from grass_index.attribute import AttributionError, verify_index
from grass_index.index import SearchSketch, SketchedIndex, VectorIndex

from test_pipeline import PROJ, SPARS, loss_fn, make_data, make_model


def test_search_sketch_is_seeded_and_unbiased():
    a, b = SearchSketch(500, 64, seed=3), SearchSketch(500, 64, seed=3)
    x = np.random.default_rng(0).standard_normal((4, 500)).astype(np.float32)
    assert np.array_equal(a(x), b(x)) and not np.array_equal(a(x), SearchSketch(500, 64, 4)(x))
    est = [float((SearchSketch(500, 64, s)(x[:1]) @ SearchSketch(500, 64, s)(x[1:2]).T)[0, 0])
           for s in range(300)]
    assert abs(np.mean(est) - float(x[0] @ x[1])) < 4 * np.std(est) / np.sqrt(300)


def test_sketched_index_reranks_exactly():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 200)).astype(np.float32)
    sk = SearchSketch(200, 32, seed=0)
    idx = SketchedIndex(VectorIndex.create(32), sk, rerank_factor=300)  # every row a candidate
    idx.add(X, np.arange(300))
    q = rng.standard_normal((3, 200)).astype(np.float32)
    exact = idx.with_rerank(lambda qq, ids: np.einsum("mk,mck->mc", qq, X[ids]))
    for opp in (False, True):
        s, i = exact.search(q, 5, opponents=opp)
        full = q @ X.T
        want = np.argsort(full if opp else -full, axis=1)[:, :5]
        assert np.array_equal(i, want)
        np.testing.assert_allclose(s, np.take_along_axis(full, want, 1), rtol=1e-5)


@pytest.fixture(scope="module")
def sketched(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "idx"
    idx = gi.build_index(make_model(), make_data(45, 1), loss_fn, out, sparsification=SPARS,
                         projection=PROJ, batch_size=8, progress=False,
                         index="flat:sketch=6,rerank=8")
    return idx


def test_build_with_search_sketch_queries_match_exact_scores(sketched):
    idx = gi.open_index(sketched.path)
    assert idx.config["index"]["search_sketch"]["dim"] == 6
    assert idx.config["index"]["dim"] == 6 and idx.config["index"]["full_dim"] == idx.dim
    assert idx.config["index"]["recall"]["recall"] >= 0.5  # recorded like any index
    q = make_data(4, 2)
    scores = idx.score(make_model(), q, loss_fn)
    got = idx.query(make_model(), q, loss_fn, k=3)
    for r, hits in enumerate(got):
        for tid, s in hits:  # re-ranked scores are the exact ones
            assert s == pytest.approx(float(scores[r, tid]), rel=1e-4, abs=1e-6)
    assert verify_index(sketched.path)["ok"]


def test_plan_gpt2_small_numbers_and_refusal(tmp_path, monkeypatch):
    dims = [dict(d_in=768, d_out=2304), dict(d_in=768, d_out=768), dict(d_in=768, d_out=3072),
            dict(d_in=3072, d_out=768)] * 12
    layout = {str(i): 4096 for i in range(48)}
    big = plan.estimate(layer_dims=dims, layout=layout, n=100_000, batch_size=32, tokens=64,
                        index_width=4096)
    assert big.fisher_disk == 48 * 4096 ** 2 * 8 and big.precond_disk == 48 * 4096 ** 2 * 4
    assert big.store_disk >= 100_000 * 196_608 * 4
    assert big.index_disk == pytest.approx(100_000 * 4096 * 4, rel=1e-3)
    assert 6.4e9 < big.ram_peak < 14e9
    # exact at n ≫ k: the 3.2 GB of inverses are 4% of the rows, so the store is scanned (no
    # copy on disk or in RAM); flat:faiss writes the 78.6 GB copy and holds it in pass 2
    scan = plan.estimate(layer_dims=dims, layout=layout, n=100_000, batch_size=32, tokens=64)
    assert scan.index_in_store and scan.index_disk == 0 and scan.ram_peak < 20e9
    flat = plan.estimate(layer_dims=dims, layout=layout, n=100_000, batch_size=32, tokens=64,
                         index="flat:faiss")
    assert not flat.index_in_store
    assert flat.index_disk == pytest.approx(100_000 * 196_608 * 4, rel=1e-3) and flat.ram_peak > 78e9
    # n = 4,096 = k: the inverses are as large as the rows: the copy keeps queries at one read
    near = plan.estimate(layer_dims=dims, layout=layout, n=4096, batch_size=32, tokens=64)
    assert not near.index_in_store and near.index_disk > 3e9
    small = plan.estimate(layer_dims=dims, layout=layout, n=64, batch_size=32, tokens=64)
    assert small.dense_layers == 0 and small.fisher_disk == 0  # Woodbury: n < k/2
    msg = plan.shortfall(big, ram=4e9, disk=None, K_per_layer=4096)
    assert "RAM" in msg and "projection='sjlt-2048'" in msg  # spelled for Python here
    from grass_index.errors import cli_spelling
    with cli_spelling():  # and as flags on the command line
        assert "--projection sjlt-2048" in plan.shortfall(big, ram=4e9, disk=None,
                                                          K_per_layer=4096)
    msg = plan.shortfall(flat, ram=None, disk=1e9, K_per_layer=4096)
    assert "disk" in msg and "index='flat:fp16'" in msg
    assert plan.shortfall(small, ram=64e9, disk=1e12, K_per_layer=4096) is None
    monkeypatch.setattr(plan, "available_ram", lambda: 1e6)  # a build is refused before pass 1
    with pytest.raises(AttributionError, match="RAM.*use"):
        gi.build_index(make_model(), make_data(45, 1), loss_fn, tmp_path / "x",
                       sparsification=SPARS, projection=PROJ, progress=False)
    assert not (tmp_path / "x").exists()
