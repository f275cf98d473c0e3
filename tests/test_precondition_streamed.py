"""Low-rank layers applied over streamed stored rows (a query's small batch) equal the same
layers applied over the rows held in memory, and never read the rows whole."""
from __future__ import annotations

import numpy as np
import pytest

import grass_index as gi
from grass_index.precondition import Preconditioner, PreconditionError
from grass_index.precondition import preconditioner as pre_mod

LAYOUT = {"low": 12, "dense": 3, "low2": 10}  # n = 8 rows: low-rank where k > 8
N = 8


def _rows(seed=0):
    G = np.random.default_rng(seed).standard_normal((N, sum(LAYOUT.values())))
    G[:, -10:] *= 1e3  # a layer on another scale
    return G.astype(np.float32)


def _fitted(G, **kw):
    acc = gi.precondition.FisherAccumulator(LAYOUT)
    import torch
    acc.update(torch.from_numpy(G))
    return Preconditioner.fit_layers(LAYOUT, damping=0.1, n=N, rows=lambda: G,
                                     take_fisher=acc.fisher, **kw)


def _stream(G, sizes):
    def blocks():
        lo = 0
        for b in sizes:
            yield lo, G[lo:lo + b]
            lo += b
    return blocks


def _streamed_only(pre: Preconditioner, blocks) -> Preconditioner:
    """The same forms, the rows reachable only as a stream (reading them whole fails)."""
    def no_rows():
        raise AssertionError("the rows were read whole")
    return Preconditioner(pre.layout, pre.hessian, pre.forms, pre.damping_used, pre.damping,
                          rows=no_rows, blocks=blocks)


@pytest.mark.parametrize("sizes", [(8,), (3, 3, 2), (1,) * 8])
def test_streamed_low_rank_equals_held_rows(sizes):
    G = _rows()
    held = _fitted(G)
    assert {n: f.kind for n, f in held.forms.items()} == {"low": "low_rank", "dense": "dense",
                                                          "low2": "low_rank"}
    streamed = _streamed_only(held, _stream(G, sizes))
    q = np.random.default_rng(1).standard_normal((5, sum(LAYOUT.values()))).astype(np.float32)
    want = held.apply(q)
    got = streamed.apply(q)
    assert got.dtype == np.float32 and got.shape == q.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(streamed.apply_layer("low2", q[:, -10:]), want[:, -10:],
                               rtol=2e-6, atol=1e-6 * np.abs(want).max())
    # exact: against the float64 inverse of each layer's Fisher + λI
    sl = slice(0, 12)
    F = G[:, sl].astype(np.float64).T @ G[:, sl].astype(np.float64) / N
    lam = held.damping_used["low"]
    ref = q[:, sl].astype(np.float64) @ np.linalg.inv(F + lam * np.eye(12))
    np.testing.assert_allclose(got[:, sl], ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_a_large_batch_reads_the_rows_once_and_keeps_them(monkeypatch):
    G = _rows()
    held = _fitted(G)
    reads = []
    pre = Preconditioner(held.layout, held.hessian, held.forms, held.damping_used, held.damping,
                         rows=lambda: reads.append(1) or G, blocks=_stream(G, (8,)))
    monkeypatch.setattr(pre_mod, "STREAM_ROWS", 4)
    q = np.random.default_rng(2).standard_normal((5, sum(LAYOUT.values()))).astype(np.float32)
    np.testing.assert_allclose(pre.apply(q), held.apply(q), rtol=1e-6)
    pre.apply(q[:2])  # rows held now: used, not streamed nor read again
    assert reads == [1]


def test_a_stream_of_other_rows_is_refused():
    G = _rows()
    held = _fitted(G)
    q = np.ones((1, sum(LAYOUT.values())), np.float32)
    for blocks in (_stream(np.concatenate([G, G[:2]]), (8, 2)), _stream(G[:6], (6,))):
        with pytest.raises(PreconditionError, match="fitted on 8 rows but the store holds"):
            _streamed_only(held, blocks).apply(q)
    shuffled = lambda: iter([(3, G[3:]), (0, G[:3])])  # noqa: E731
    with pytest.raises(PreconditionError, match="not in id order"):
        _streamed_only(held, shuffled).apply(q)


def test_an_index_query_streams_its_low_rank_rows(tmp_path):
    from test_pipeline import loss_fn, make_data, make_model
    idx = gi.build_index(make_model(), make_data(20, 1), loss_fn, tmp_path / "idx",
                         sparsification="identity", projection="identity", batch_size=8,
                         progress=False)  # k = 30 and 18 > n = 20 for one layer at least
    pre = gi.open_index(tmp_path / "idx").preconditioner
    assert "low_rank" in {f.kind for f in pre.forms.values()}
    q = np.random.default_rng(3).standard_normal((3, pre.dim)).astype(np.float32)
    got = pre.apply(q)
    assert pre._rows is None  # streamed: never read whole
    pre.rows()
    np.testing.assert_allclose(got, pre.apply(q), rtol=2e-6, atol=1e-6 * np.abs(got).max())


def test_a_two_stage_query_reranks_through_streamed_rows_and_a_server_keeps_them(tmp_path):
    from _tiny_task import write_task
    from grass_index.task import load_task

    t = load_task(write_task(tmp_path, n_train=20))
    out = tmp_path / "idx"
    gi.build_index(t.model(), t.train_data(), t.loss, out, sparsification="identity",
                   projection="identity", batch_size=8, task=t.ref, progress=False,
                   index="flat:sketch=6,rerank=8")
    idx = gi.open_index(out)
    assert "low_rank" in {f.kind for f in idx.preconditioner.forms.values()}
    q = t.query_data()
    scores = idx.score(t.model(), q, t.loss)  # every stored row preconditioned (rows read)
    fresh = gi.open_index(out)
    got = fresh.query(t.model(), q, t.loss, k=3)
    assert fresh.preconditioner._rows is None  # the re-rank streamed them
    for r, hits in enumerate(got):
        for tid, s in hits:
            assert s == pytest.approx(float(scores[r, tid]), rel=1e-4, abs=1e-6)
    pytest.importorskip("fastapi")
    from grass_index.serve import Engine

    eng = Engine(out, str(t.ref), verify=False)
    assert eng.idx.preconditioner._rows is not None  # a server reads them once, keeps them
