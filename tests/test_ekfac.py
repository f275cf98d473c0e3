"""EK-FAC for factored sketches with an identity projection: the factors pass 1 keeps, the
fitted preconditioner and the preconditioned sketches, against a dense EK-FAC computed here
directly (torch) from per-token activations and output gradients; resume/merge; refusals."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grass_index as gi
from grass_index.pipeline.factors import Pass1Factors
from grass_index.precondition import KroneckerFactors, load_factors
from grass_index.store import SketchStore

T = 3  # tokens per example


class Seq(nn.Module):
    """A token-wise MLP on [B, T, 4] whose loss sums over tokens: each layer's per-example
    gradient is Σ_t Dy_t x_tᵀ, the Kronecker-factored case."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, T, 4, generator=g),
                                          torch.randint(0, 3, (n, T), generator=g))


def _loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="none"
                           ).reshape(len(x), T).sum(1)


def _reference(model, data, damping):
    """Dense EK-FAC per layer from per-token inputs (with the bias column) and output
    gradients: {layer: (A, G, Λ, inverse [k, k], per-example gradients [n, k])}."""
    x, y = data.tensors
    acts = {}

    def keep(name):
        def hook(mod, inp, out):
            out.retain_grad()
            acts[name] = (inp[0], out)
        return hook
    hs = [model.l1.register_forward_hook(keep("l1")), model.l2.register_forward_hook(keep("l2"))]
    _loss(model, (x, y)).sum().backward()
    for h in hs:
        h.remove()
    model.zero_grad()
    out = {}
    for name, (inp, o) in acts.items():
        X = torch.cat([inp.detach(), torch.ones(*inp.shape[:-1], 1)], -1).double()  # +bias col
        Dy = o.grad.detach().double()
        A = torch.einsum("nti,ntj->ij", X, X)
        G = torch.einsum("nti,ntj->ij", Dy, Dy)
        grads = torch.einsum("nto,nti->noi", Dy, X).reshape(len(x), -1)                # row-major
        _, QA = torch.linalg.eigh(A)
        _, QG = torch.linalg.eigh(G)
        Q = torch.kron(QG, QA)
        lam = ((grads @ Q) ** 2).mean(0)
        inv = Q @ torch.diag(1.0 / (lam + damping * lam.mean())) @ Q.T
        out[name] = (A, G, lam, inv, grads)
    return out


def _build(tmp_path, name="idx", hessian="ekfac", damping=0.1, **kw):
    model, data = Seq().eval(), _data()
    kw.setdefault("batch_size", 8)
    idx = gi.build_index(model, data, _loss, out=tmp_path / name, sparsification="identity-8*8",
                         projection="identity", hessian=hessian, damping=damping,
                         progress=False, **kw)
    return idx, model, data


def test_ekfac_equals_dense_reference(tmp_path):
    damping = 0.1
    idx, model, data = _build(tmp_path, damping=damping)
    ref = _reference(model, data, damping)
    with SketchStore.open(tmp_path / "idx" / "sketches") as st:
        f = load_factors(st)
        raw = st.get_rows(np.arange(st.num_rows))
    assert f.blocks == 5 and not f.missing
    pre = gi.open_index(tmp_path / "idx")
    assert pre.config["hessian"] == "ekfac"
    start = 0
    for name in ("l1", "l2"):
        A, G, lam, inv, grads = ref[name]
        np.testing.assert_allclose(f.A[name], A.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(f.G[name], G.numpy(), rtol=1e-8, atol=1e-12)
        k = grads.shape[1]
        # the stored sketch is the per-example gradient (identity compression)
        np.testing.assert_allclose(raw[:, start:start + k], grads.numpy(), rtol=1e-4, atol=1e-6)
        start += k
    # the preconditioner's inverse and the preconditioned sketches
    from grass_index.precondition import load_preconditioner
    with SketchStore.open(tmp_path / "idx" / "sketches") as st:
        p = load_preconditioner(st, pre.config["preconditioner_key"], pre.layout)
    start = 0
    for name in ("l1", "l2"):
        A, G, lam, inv, grads = ref[name]
        k = grads.shape[1]
        scale = float(np.abs(inv.numpy()).max())
        assert p.forms[name].kind == "ekfac"  # kept as its eigenbasis: no k×k matrix stored
        np.testing.assert_allclose(p.dense(name), inv.numpy(), rtol=1e-3, atol=1e-4 * scale)
        got = p.apply(raw)[:, start:start + k]
        want = (grads @ inv).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
        assert p.damping_used[name] == pytest.approx(damping * float(lam.mean()), rel=1e-5)
        start += k


def test_scores_use_ekfac(tmp_path):
    idx, model, data = _build(tmp_path, damping=0.3)
    ref = _reference(model, data, 0.3)
    q = torch.utils.data.Subset(data, [0, 1])
    got = idx.score(model, q, _loss).numpy()
    want = sum((ref[n][4][:2] @ ref[n][3] @ ref[n][4].T).numpy() for n in ("l1", "l2"))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4 * np.abs(want).max())


def test_factors_kept_for_any_hessian_and_reprecondition(tmp_path):
    idx, model, data = _build(tmp_path, hessian="eFIM", damping=None)
    assert idx.config["hessian"] == "eFIM"
    idx.reprecondition(hessian="ekfac", damping=0.1)
    ekfac = gi.open_index(tmp_path / "idx")
    assert ekfac.config["hessian"] == "ekfac"
    _build(tmp_path, name="direct", damping=0.1)
    s1 = ekfac.score(model, torch.utils.data.Subset(data, [3]), _loss)
    s2 = gi.open_index(tmp_path / "direct").score(model, torch.utils.data.Subset(data, [3]), _loss)
    assert torch.equal(s1, s2)


def test_reprecondition_without_factors_says_what_is_missing(tmp_path):
    model, data = Seq().eval(), _data()
    idx = gi.build_index(model, data, _loss, out=tmp_path / "x", sparsification="identity-8*8",
                         projection="sjlt-8", progress=False, batch_size=8)
    with pytest.raises(gi.GrassIndexError, match="projection 'identity'"):
        idx.reprecondition(hessian="ekfac")
    # a store whose factors were lost (or an index built before they were kept)
    idx2, _, _ = _build(tmp_path, name="y", hessian="eFIM", damping=None)
    with SketchStore.open(tmp_path / "y" / "sketches", readonly=False) as st:
        st.delete_array("kfac/state")
    with pytest.raises(gi.GrassIndexError, match="no Kronecker factors"):
        idx2.reprecondition(hessian="ekfac")


def test_ekfac_refused_on_other_specs(tmp_path):
    model, data = Seq().eval(), _data()
    for sp, pr, what in [("random_mask-4*3", "sjlt-8", "projection 'identity'"),
                         ("sjlt-8", "identity", "factored sparsification")]:
        with pytest.raises(gi.GrassIndexError, match=what) as e:
            gi.build_index(model, data, _loss, out=tmp_path / sp, sparsification=sp,
                           projection=pr, hessian="ekfac", progress=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / sp).exists()


def test_resume_keeps_bit_identical_factors(tmp_path, monkeypatch):
    _build(tmp_path, name="full", hessian="identity", damping=None)
    # interrupted after block 2 of 5, with the factor checkpoint one block behind
    import grass_index.pipeline.factors as fa
    import grass_index.pipeline.sketching as sk
    monkeypatch.setattr(fa, "SAVE_EVERY_S", 0.0)  # checkpoint after every block
    real = sk.Pass1Factors.committed
    calls = {"n": 0}

    def crash(self, last=False):
        calls["n"] += 1
        if calls["n"] <= 2:
            real(self, last)
        elif calls["n"] == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(sk.Pass1Factors, "committed", crash)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, name="resumed", hessian="identity", damping=None)
    monkeypatch.setattr(sk.Pass1Factors, "committed", real)
    with SketchStore.open(tmp_path / "resumed" / "sketches") as st:
        assert st.committed_blocks == 4 and load_factors(st).blocks == 2
    _build(tmp_path, name="resumed", hessian="identity", damping=None)
    with SketchStore.open(tmp_path / "full" / "sketches") as a, \
            SketchStore.open(tmp_path / "resumed" / "sketches") as b:
        fa, fb = load_factors(a), load_factors(b)
    assert fa.blocks == fb.blocks == 5
    for n in ("l1", "l2"):
        assert np.array_equal(fa.A[n], fb.A[n]) and np.array_equal(fa.G[n], fb.G[n])


def test_merge_of_worker_shards_keeps_factors(tmp_path):
    model, data = Seq().eval(), _data()
    opts = gi.BuildOptions(sparsification="identity-8*8", projection="identity", batch_size=8)
    for i in range(2):
        gi.build_shard(model, data, _loss, tmp_path / "w", (i, 2), opts, progress=False)
    gi.merge_shards(tmp_path / "w", hessian="ekfac", damping=0.1, progress=False)
    _build(tmp_path, name="one", damping=0.1)
    with SketchStore.open(tmp_path / "w" / "sketches") as a, \
            SketchStore.open(tmp_path / "one" / "sketches") as b:
        fa, fb = load_factors(a), load_factors(b)
    assert fa.blocks == fb.blocks == 5
    for n in ("l1", "l2"):  # summed in shard order: equal to float64 rounding
        np.testing.assert_allclose(fa.A[n], fb.A[n], rtol=1e-13)
        np.testing.assert_allclose(fa.G[n], fb.G[n], rtol=1e-13)
    # merging again gives the same bits
    shutil.copytree(tmp_path / "w" / "shards", tmp_path / "w2" / "shards")
    shutil.copy(tmp_path / "w" / "build.json", tmp_path / "w2" / "build.json")
    gi.merge_shards(tmp_path / "w2", hessian="ekfac", damping=0.1, progress=False)
    with SketchStore.open(tmp_path / "w2" / "sketches") as c:
        fc = load_factors(c)
    assert all(np.array_equal(fa.A[n], fc.A[n]) and np.array_equal(fa.G[n], fc.G[n])
               for n in ("l1", "l2"))


def test_factor_state_round_trip():
    f = KroneckerFactors({"a": (2, 3)})
    obs = f.observer("a")
    obs(torch.randn(4, 2, 2), torch.randn(4, 2, 3))
    f.end_batch()
    g = KroneckerFactors.from_state_dict(f.state_dict())
    assert g.shapes == f.shapes and g.blocks == 1 and g.tokens == {"a": 8}
    assert np.array_equal(g.A["a"], f.A["a"]) and not g.missing
    f2 = KroneckerFactors({"a": (2, 3), "b": (1, 1)})
    f2.end_batch()
    assert "b" in f2.missing and "a" in f2.missing
    assert Pass1Factors is not None


class WithNorm(nn.Module):
    """Linear, LayerNorm (a flat parameter: no Kronecker factors), Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.norm, self.l2 = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.norm(self.l1(x))))


def test_layers_without_factors_get_efim(tmp_path):
    from grass_index.precondition import load_preconditioner

    model, data = WithNorm().eval(), _data()
    kw = dict(sparsification="identity-8*8", projection="identity", damping=0.1,
              progress=False, batch_size=8, layers="*")  # every parameter, the norm's too
    ek = gi.build_index(model, data, _loss, out=tmp_path / "ek", hessian="ekfac", **kw)
    ef = gi.build_index(model, data, _loss, out=tmp_path / "ef", hessian="eFIM", **kw)
    flat = [n for n in ek.layout if n.startswith("norm")]
    assert flat and set(ek.config["preconditioner"]["efim_layers"]) == set(flat)
    pres = []
    for d, idx in (("ek", ek), ("ef", ef)):
        with SketchStore.open(tmp_path / d / "sketches") as st:
            pres.append(load_preconditioner(st, idx.config["preconditioner_key"], idx.layout))
    for n in flat:  # the same eFIM inverse as an eFIM build's
        np.testing.assert_allclose(pres[0].dense(n), pres[1].dense(n), rtol=1e-5,
                                   atol=1e-6 * np.abs(pres[1].dense(n)).max())
    ref = _reference_layer(model, data, 0.1)
    np.testing.assert_allclose(pres[0].dense("l2"), ref, rtol=1e-3,
                               atol=1e-4 * np.abs(ref).max())


def _reference_layer(model, data, damping):
    """Dense EK-FAC inverse of l2 (inputs with the bias column) from per-token tensors."""
    x, y = data.tensors
    kept = {}

    def hook(mod, inp, out):
        out.retain_grad()
        kept["x"], kept["o"] = inp[0], out
    h = model.l2.register_forward_hook(hook)
    _loss(model, (x, y)).sum().backward()
    h.remove()
    model.zero_grad()
    X = torch.cat([kept["x"].detach(), torch.ones(*kept["x"].shape[:-1], 1)], -1).double()
    Dy = kept["o"].grad.detach().double()
    QA = torch.linalg.eigh(torch.einsum("nti,ntj->ij", X, X))[1]
    QG = torch.linalg.eigh(torch.einsum("nti,ntj->ij", Dy, Dy))[1]
    Q = torch.kron(QG, QA)
    lam = ((torch.einsum("nto,nti->noi", Dy, X).reshape(len(x), -1) @ Q) ** 2).mean(0)
    return (Q @ torch.diag(1.0 / (lam + damping * lam.mean())) @ Q.T).numpy()


def test_cli_build_ekfac(tmp_path):
    """`build --hessian ekfac`: one error line with the fix on a spec without factors; a build
    with a factored identity spec records hessian ekfac."""
    import json

    from typer.testing import CliRunner

    from _tiny_task import write_task
    from grass_index.cli.main import app

    task = write_task(tmp_path)
    run = CliRunner().invoke
    bad = run(app, ["build", str(task), "--out", str(tmp_path / "bad"), "--hessian", "ekfac",
                    "--sparsification", "random_mask-4*3", "--projection", "sjlt-8"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    err = bad.stderr.strip()
    assert "--projection identity" in err and len(err.splitlines()) == 1, err
    ok = run(app, ["build", str(task), "--out", str(tmp_path / "ok"), "--hessian", "EKFAC",
                   "--sparsification", "identity-8*8", "--projection", "identity",
                   "--batch-size", "8"])
    assert ok.exit_code == 0, ok.output
    info = run(app, ["info", str(tmp_path / "ok"), "--json"])
    assert json.loads(info.stdout)["config"]["hessian"] == "ekfac"
