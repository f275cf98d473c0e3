"""Preconditioner: exact linear algebra, damping semantics, and exact influence on tiny models."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grass_index.precondition import (DEFAULT_DAMPING, FisherAccumulator, Preconditioner,
                                      parse_damping)
from grass_index.precondition.damping import AUTO_MULTIPLE, LEGACY_DAMPING

LAYOUT = {"a": 3, "b": 5}


def _sketches(n=40, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_fisher_is_mean_outer_product_per_layer_and_merges():
    G = _sketches()
    acc = FisherAccumulator(LAYOUT)
    for chunk in np.array_split(G, 3):
        acc.update(torch.from_numpy(chunk))
    G64 = G.astype(np.float64)
    np.testing.assert_allclose(acc.fisher("a"), G64[:, :3].T @ G64[:, :3] / 40, rtol=1e-6)
    np.testing.assert_allclose(acc.fisher("b"), G64[:, 3:].T @ G64[:, 3:] / 40, rtol=1e-6)
    assert acc.n == 40 and acc.fisher("a").dtype == np.float64
    # sharded: two halves merged == one pass; state_dict round-trips
    left, right = FisherAccumulator(LAYOUT), FisherAccumulator(LAYOUT)
    left.update(G[:25]), right.update(G[25:])
    left.merge(right)
    np.testing.assert_allclose(left.fisher("b"), acc.fisher("b"), rtol=1e-6)
    again = FisherAccumulator(LAYOUT)
    again.load_state_dict(acc.state_dict())
    assert again.n == 40 and np.array_equal(again.fisher("a"), acc.fisher("a"))


def test_fisher_bad_input():
    acc = FisherAccumulator(LAYOUT)
    with pytest.raises(ValueError, match="no sketches accumulated"):
        acc.fisher("a")
    with pytest.raises(ValueError, match=r"shape \[B, 8\]"):
        acc.update(np.zeros((2, 7)))
    bad = _sketches(4)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        acc.update(bad)
    with pytest.raises(ValueError, match="different layouts"):
        acc.merge(FisherAccumulator({"a": 3, "b": 4}))
    with pytest.raises(ValueError, match="another layout"):
        FisherAccumulator({"c": 2}).load_state_dict(acc.state_dict())


@pytest.mark.parametrize("damping,mode,value", [
    (None, "relative", LEGACY_DAMPING), (DEFAULT_DAMPING, "auto", AUTO_MULTIPLE),
    ("auto", "auto", AUTO_MULTIPLE), (0.5, "relative", 0.5), ("0.01", "relative", 0.01),
    ("abs:1e-3", "absolute", 1e-3), ("rel:2", "relative", 2.0), (1e-8, "relative", 1e-8)])
def test_parse_damping(damping, mode, value):
    assert parse_damping(damping) == (mode, value)


@pytest.mark.parametrize("bad", ["abs:", "fast", -0.1, "abs:-1", float("nan"), True, [0.1],
                                 0, "abs:0", 1e300, "abs:1e300", "inf"])
def test_parse_damping_rejects_with_syntax(bad):
    with pytest.raises(ValueError, match=r"abs:1e-3"):
        parse_damping(bad)


@pytest.mark.parametrize("damping", [None, 0.3, "abs:0.05"])
def test_efim_equals_solve_with_damping(damping):
    G = _sketches()
    acc = FisherAccumulator(LAYOUT)
    acc.update(G)
    P = Preconditioner.fit(acc.fishers(), LAYOUT, hessian="eFIM", damping=damping)
    q = _sketches(6, seed=1)
    got = P.apply(torch.from_numpy(q))
    assert got.dtype == np.float32 and got.shape == (6, 8)
    mode, value = parse_damping(damping)
    for name, sl in (("a", slice(0, 3)), ("b", slice(3, 8))):
        Fl = acc.fisher(name)
        lam = value * np.trace(Fl) / Fl.shape[0] if mode == "relative" else value
        assert P.damping_used[name] == pytest.approx(lam, rel=1e-10)
        want = np.linalg.solve(Fl + lam * np.eye(Fl.shape[0]), q[:, sl].astype(np.float64).T).T
        np.testing.assert_allclose(got[:, sl], want, rtol=1e-5, atol=1e-6)


def test_identity_and_state_round_trip(tmp_path):
    acc = FisherAccumulator(LAYOUT)
    acc.update(_sketches())
    q = _sketches(5, seed=2)
    ident = Preconditioner.fit(acc.fishers(), LAYOUT, hessian="identity")
    assert np.array_equal(ident.apply(q), q) and ident.damping_used == {"a": 0.0, "b": 0.0}
    for P in (ident, Preconditioner.fit(acc.fishers(), LAYOUT, hessian="efim", damping=0.2)):
        np.savez(tmp_path / "p.npz", **P.state_dict())  # plain arrays: no pickle needed
        back = Preconditioner.from_state_dict(dict(np.load(tmp_path / "p.npz")), LAYOUT)
        assert np.array_equal(back.apply(q), P.apply(q))
        assert back.describe() == P.describe()


def test_bad_hessian_and_singular():
    zero = {"a": np.zeros((3, 3)), "b": np.eye(5)}
    with pytest.raises(ValueError, match="unknown hessian 'kfac'.*eFIM, identity"):
        Preconditioner.fit(zero, LAYOUT, hessian="kfac")
    # an all-zero block (no gradient reaches the layer) is dropped, not an error
    P = Preconditioner.fit(zero, LAYOUT, damping=0.1)
    assert P.dropped == ["a"] and "a" in P.describe()["dropped"]
    out = P.apply(np.ones((2, 8)))
    assert not out[:, :3].any() and np.allclose(out[:, 3:], 1 / 1.1)
    back = Preconditioner.from_state_dict(P.state_dict(), LAYOUT)
    assert back.dropped == ["a"] and np.array_equal(back.apply(np.ones((2, 8))), out)
    # a block still not positive definite at the smallest accepted damping (0 is refused when
    # parsed) names the layer and a per-layer remedy
    deficient = {"a": np.diag([1.0, 0.0, -1e-3]), "b": np.eye(5)}
    with pytest.raises(ValueError, match=r"layer 'a'.*singular.*layers='!a\.\*'"):
        Preconditioner.fit(deficient, LAYOUT, damping=1e-8)
    from grass_index.errors import cli_spelling
    with cli_spelling(), pytest.raises(ValueError, match=r"layer 'a'.*singular.*--layers '!a\.\*'"):
        Preconditioner.fit(deficient, LAYOUT, damping=1e-8)
    P = Preconditioner.fit(zero, LAYOUT, damping="abs:2")  # training rows there are zero anyway
    np.testing.assert_allclose(P.apply(np.ones((1, 8)))[0], [0] * 3 + [1 / 3] * 5, rtol=1e-6)
    with pytest.raises(ValueError, match="no Fisher matrix"):
        Preconditioner.fit({"a": np.eye(3)}, LAYOUT)


# ---------------------------------------------------------------- exact influence, tiny models
def _logistic_data(n=30, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 2, (n,), generator=g).float()


def _logistic_loss(model, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none")


def _scores(model, train, test, loss_fn, hessian, damping):
    from grass_index.capture import GradientSketcher, select_layers

    sk = GradientSketcher(model, select_layers(model), sparsification="identity",
                          projection="identity")
    acc = FisherAccumulator(sk.layout)
    tr = torch.cat([sk.sketch((train[0][i:i + 7], train[1][i:i + 7]), loss_fn)
                    for i in range(0, len(train[0]), 7)])
    acc.update(tr)
    P = Preconditioner.fit(acc.fishers(), sk.layout, hessian=hessian, damping=damping)
    return sk.sketch(test, loss_fn).double().numpy() @ P.apply(tr).astype(np.float64).T


@pytest.mark.parametrize("damping", [0.1, "abs:0.01"])
def test_logistic_regression_influence_is_analytic(damping):
    pytest.importorskip("grass_index.compress")
    torch.manual_seed(0)
    model = nn.Linear(4, 1).eval()
    train, test = _logistic_data(30), _logistic_data(5, seed=1)
    got = _scores(model, train, test, _logistic_loss, "eFIM", damping)

    def grads(x, y):  # ∇_[w, b] BCE = (σ(w·x + b) − y) [x, 1]
        with torch.no_grad():
            r = torch.sigmoid(model(x).squeeze(-1)) - y
        return (r[:, None] * torch.cat([x, torch.ones(len(x), 1)], 1)).double().numpy()

    Gtr, Gte = grads(*train), grads(*test)
    Fm = Gtr.T @ Gtr / len(Gtr)
    mode, value = parse_damping(damping)
    lam = value * np.trace(Fm) / 5 if mode == "relative" else value
    want = Gte @ np.linalg.solve(Fm + lam * np.eye(5), Gtr.T)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_linear_regression_sign_convention():
    """Positive score = proponent: a small gradient step on the top-scored training example
    lowers the test loss, one on the bottom-scored raises it (identity Hessian: score = g·g_i)."""
    pytest.importorskip("grass_index.compress")
    torch.manual_seed(0)
    model = nn.Linear(3, 1).eval()
    g = torch.Generator().manual_seed(3)
    xtr, ytr = torch.randn(20, 3, generator=g), torch.randn(20, generator=g)
    xte, yte = torch.randn(1, 3, generator=g), torch.randn(1, generator=g)
    loss = lambda m, b: 0.5 * (m(b[0]).squeeze(-1) - b[1]) ** 2  # noqa: E731
    s = _scores(model, (xtr, ytr), (xte, yte), loss, "identity", None)[0]
    with torch.no_grad():
        base = float(loss(model, (xte, yte)))
    for i, direction in ((int(s.argmax()), -1), (int(s.argmin()), +1)):
        m = nn.Linear(3, 1)
        m.load_state_dict(model.state_dict())
        loss(m, (xtr[i:i + 1], ytr[i:i + 1])).sum().backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 1e-3 * p.grad
        with torch.no_grad():
            assert np.sign(float(loss(m, (xte, yte))) - base) == direction
    assert s.max() > 0 > s.min()


class _TwoLayer(nn.Module):
    """l1: k = 6·8 + 8 = 56 > n (low-rank form), l2: k = 8 + 1 = 9 < n (dense form)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).squeeze(-1)


def _mse(model, batch):
    return 0.5 * (model(batch[0]) - batch[1]) ** 2


def _regression(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g),
                                          torch.randn(n, generator=g))


def _tiny_index(tmp_path, name, dense: bool, monkeypatch, **kw):
    import grass_index as gi
    from grass_index.precondition import preconditioner as pre_mod

    with monkeypatch.context() as m:
        if dense:  # today's dense form for every layer (pass 1 then keeps the Fisher sums)
            m.setattr(pre_mod, "uses_low_rank", lambda n, k: False)
        return gi.build_index(_TwoLayer().eval(), _regression(20, 1), _mse, out=tmp_path / name,
                              sparsification="identity", projection="identity",
                              progress=False, batch_size=8, **kw)


@pytest.mark.parametrize("damping", [None, "abs:0.05"])
def test_each_form_scores_like_the_dense_inverse(tmp_path, monkeypatch, damping):
    """The forms an eFIM build keeps (low-rank where n < k, dense where n ≥ k) give the scores
    of a build that forms every layer's dense inverse, to float32 rounding — through the FAISS
    vectors pass 2 wrote and through the query side's (memory-mapped) preconditioner."""
    import grass_index as gi

    forms = _tiny_index(tmp_path, "forms", False, monkeypatch, damping=damping)
    dense = _tiny_index(tmp_path, "dense", True, monkeypatch, damping=damping)
    assert forms.config["preconditioner"]["forms"] == {"l1": "low_rank", "l2": "dense"}
    assert dense.config["preconditioner"]["forms"] == {"l1": "dense", "l2": "dense"}
    assert forms.config["damping_used"] == pytest.approx(dense.config["damping_used"], rel=1e-6)
    model, queries = _TwoLayer().eval(), _regression(5, 2)
    want = dense.score(model, queries, _mse).numpy()
    got = forms.score(model, queries, _mse).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    q = forms.query_sketches(model, queries, _mse)
    for r, hits in enumerate(forms.search(q, 20)):
        for i, s in hits:
            assert s == pytest.approx(want[r, i], rel=1e-4, abs=1e-5 * np.abs(want).max())
    reopened = gi.open_index(tmp_path / "forms")  # the query side's load (mapped, rows on use)
    raw = np.asarray(q, dtype=np.float32)
    np.testing.assert_allclose(reopened.preconditioner.apply(raw),
                               dense.preconditioner.apply(raw), rtol=1e-4,
                               atol=1e-5 * np.abs(dense.preconditioner.apply(raw)).max())


def test_forms_round_trip_through_a_store(tmp_path, monkeypatch):
    """Every form (low-rank, dense, EK-FAC, zero) is saved as its own arrays and loads back —
    memory-mapped or read whole — applying exactly as fitted; a store written before the forms
    (a dense inverse per layer, no form names) still loads, as dense layers."""
    from grass_index.precondition import load_preconditioner, save_preconditioner
    from grass_index.precondition.persist import state_to_array
    from grass_index.store import SketchStore
    from grass_index.store import arrays as store_arrays

    monkeypatch.setattr(store_arrays, "FILE_BYTES", 64)  # every array but the tiniest a file
    layout = {"low": 12, "dense": 3, "ek": 6, "zero": 4}
    rows = np.random.default_rng(0).standard_normal((5, 25)).astype(np.float32)
    rows[:, 21:] = 0
    efim = Preconditioner.fit_layers(layout, n=5, rows=lambda: rows, damping=0.2,
                                     take_fisher=lambda name: _fisher_of(rows, layout, name))
    qg, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((2, 2)))
    qa, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((3, 3)))
    pre = Preconditioner.fit_ekfac(layout, {"ek": (qg, qa)}, {"ek": np.arange(1.0, 7.0)},
                                   damping=0.2, efim=efim, rows=lambda: rows)
    assert {n: f.kind for n, f in pre.forms.items()} == {
        "low": "low_rank", "dense": "dense", "ek": "ekfac", "zero": "zero"}
    q = np.random.default_rng(3).standard_normal((4, 25)).astype(np.float32)
    with SketchStore.create(tmp_path / "s", dim=25, meta={}) as st:
        save_preconditioner(st, "k", pre)
        for mapped in (False, True):
            back = load_preconditioner(st, "k", layout, mapped=mapped, rows=lambda: rows)
            assert np.array_equal(back.apply(q), pre.apply(q))
            assert back.describe() == pre.describe()
        old = {k: v for k, v in efim.state_dict().items() if not k.startswith("form/")}
        old.update({f"inverse/{n}": efim.dense(n).astype(np.float32) for n in layout})
        old = {k: v for k, v in old.items() if not k.startswith("core/")}
        st.put_array("precond/old", state_to_array(old))  # the oldest layout: one .npz array
        legacy = load_preconditioner(st, "old", layout)
        assert {f.kind for f in legacy.forms.values()} == {"dense"}
        np.testing.assert_allclose(legacy.apply(q), efim.apply(q), rtol=1e-5, atol=1e-6)


def _fisher_of(rows, layout, name):
    start = 0
    for n, k in layout.items():
        if n == name:
            g = rows[:, start:start + k].astype(np.float64)
            return g.T @ g / len(g)
        start += k


def test_ekfac_form_equals_its_dense_inverse():
    """Applying EK-FAC by rotation equals the dense Q diag(Λ + λ)⁻¹ Qᵀ, Q = Q_G ⊗ Q_A, that
    pass 2 used to form (row-major k_out × k_in sketches)."""
    from grass_index.precondition.forms import Ekfac

    rng = np.random.default_rng(4)
    qg, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    qa, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    eig, lam = rng.uniform(0.1, 5, 12), 0.3
    Q = np.kron(qg, qa)
    want_inv = (Q / (eig + lam)) @ Q.T
    x = rng.standard_normal((7, 12)).astype(np.float32)
    got = Ekfac(qg, qa, eig, lam).apply(x, rows=None)
    np.testing.assert_allclose(got, x.astype(np.float64) @ want_inv, rtol=1e-5, atol=1e-6)


def test_unrepresentable_rows_judge_each_layer_against_its_own_sketch():
    """issue 20 §1: a saturated example (sketch ~1e-38) is not a casualty of the damping, even
    under identity; a full-precision block that preconditioning took below float32's normal
    range is; so is an overflow. Saturated blocks are stored as exactly 0."""
    from grass_index.precondition import unrepresentable_rows, zero_saturated_blocks
    from grass_index.precondition.fisher import layer_slices

    slices = layer_slices(LAYOUT)  # a: 3 columns, b: 5
    raw = np.ones((4, 8), np.float32)
    raw[0, :3] = 3e-39             # saturated in layer a (a float32 subnormal)
    raw[1] = 0                     # a zero row
    vec = raw.copy()               # identity
    assert [len(x) for x in unrepresentable_rows(raw, vec, slices)] == [0, 0]
    vec[2, 3:] = 1e-40             # layer b of a full-precision row underflowed
    vec[3, 0] = np.inf             # row 3 overflowed
    under, over = unrepresentable_rows(raw, vec, slices)
    assert under.tolist() == [2] and over.tolist() == [3]
    raw[2, 3:] = 1e-31             # ...but that row's block was already below REPRESENTABLE
    assert unrepresentable_rows(raw, vec, slices)[0].tolist() == []
    out = zero_saturated_blocks(raw, vec.copy(), slices)
    assert not out[0, :3].any() and (out[0, 3:] == 1).all()   # only the saturated block
    assert not out[2, 3:].any() and (out[2, :3] == 1).all()
    assert np.array_equal(out[3], vec[3], equal_nan=True)



def test_a_saturated_block_is_stored_as_zero_whatever_its_preconditioned_value():
    """A fully saturated model's Fisher is ~1e-44: 1/λ overflows float32, so a saturated
    block's vector may be inf/NaN; it is stored as 0 and never blamed on the damping, while a
    representable block that overflows is (and, λ being below float32's range, the fix named
    is the identity Hessian: no relative damping fits)."""
    from grass_index.indexdir.stored import damping_refused
    from grass_index.precondition import guard_precision
    from grass_index.precondition.fisher import layer_slices

    slices = layer_slices(LAYOUT)
    raw = np.full((2, 8), 1e-20, np.float32)
    raw[0] = 1e-39                       # saturated everywhere
    vec = np.full((2, 8), np.inf, np.float32)
    vec[1, 3:] = 1.0                     # row 1: layer a overflowed, layer b fine
    out, under, over = guard_precision(raw, vec, slices)
    assert under.tolist() == [] and over.tolist() == [1]
    assert not out[0].any()              # the saturated row: exactly 0, no inf/NaN left

    class Pre:
        damping_used = {"a": 3e-45, "b": 0.3}
    err = damping_refused(Pre, [1], "over")
    assert err.needs == "identity" and "below float32's range" in str(err)
