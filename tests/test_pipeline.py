"""End-to-end correctness of the attribution pipeline on a tiny model.

The reference path is independent of the hooks: exact per-sample gradients (torch.func), fed
through the same seeded compressors, a float64 Fisher and a direct solve.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grass_index as gi
from grass_index.capture import GradientSketcher, per_sample_gradients, select_layers
from grass_index.precondition import DEFAULT_DAMPING

N_TRAIN, N_QUERY = 45, 6
SPARS, PROJ = "random_mask-4*3", "sjlt-8"


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def collate_all(data):
    return torch.utils.data.default_collate([data[i] for i in range(len(data))])


def exact_sketches(model, data, spars, proj, seed=0):
    """[n, K] sketches from exact per-sample gradients through the index's own compressors."""
    layers = select_layers(model)
    sk = GradientSketcher(model, layers, sparsification=spars, projection=proj, seed=seed)
    grads = per_sample_gradients(model, collate_all(data), loss_fn, layers)
    parts = []
    for layer in layers:
        G = grads[layer.name].double().reshape(len(data), layer.d_out, layer.d_in_eff)
        # G = sum_a G[:, a] e_a^T: "tokens" a with input e_a and output gradient G[:, a]
        eye = torch.eye(layer.d_in_eff, dtype=torch.float64).expand(len(data), -1, -1)
        comp = sk.compressors[layer.name].double()
        with torch.no_grad():
            parts.append(comp(eye, G.transpose(1, 2)))
    return torch.cat(parts, 1).double(), sk.layout, grads


def auto_lambda(Fl):
    """The "auto" rule written out: 30 × the eigenvalue (largest first) at which the running
    sum of the spectrum first reaches 99.95% of the trace."""
    e = torch.linalg.eigvalsh(Fl).clamp_min(0).flip(0)
    j = int((torch.cumsum(e, 0) / e.sum() < 0.9995).sum())
    return 30.0 * e[min(j, len(e) - 1)]


def brute_force_scores(q, g, layout, damping):
    """g(z)^T (F_l + lambda_l I)^-1 g(z_i) per layer, lambda_l = damping * mean eig(F_l), or
    the "auto" rule (the default) on F_l's spectrum."""
    out = torch.zeros(q.shape[0], g.shape[0], dtype=torch.float64)
    o = 0
    for k in layout.values():
        gl, ql = g[:, o:o + k], q[:, o:o + k]
        Fl = gl.T @ gl / g.shape[0]
        lam = auto_lambda(Fl) if damping == "auto" else damping * torch.trace(Fl) / k
        out += ql @ torch.linalg.solve(Fl + lam * torch.eye(k, dtype=torch.float64), gl.T)
        o += k
    return out


@pytest.fixture(scope="module")
def setup():
    return make_model(), make_data(N_TRAIN, 1), make_data(N_QUERY, 2)


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    model, train, query = setup
    out = tmp_path_factory.mktemp("idx") / "run"
    idx = gi.build_index(model, train, loss_fn, out, sparsification=SPARS, projection=PROJ,
                         batch_size=8, progress=False)
    return idx, out


def test_index_scores_equal_brute_force_influence(setup, built):
    model, train, query = setup
    idx, _ = built
    g, layout, _ = exact_sketches(model, train, SPARS, PROJ)
    q, _, _ = exact_sketches(model, query, SPARS, PROJ)
    assert idx.layout == layout
    assert DEFAULT_DAMPING == "auto" and idx.config["damping"] == "auto"  # the new default
    want = brute_force_scores(q, g, layout, DEFAULT_DAMPING)
    got = idx.score(model, query, loss_fn).double()
    assert got.shape == (N_QUERY, N_TRAIN)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5 * want.abs().max().item())


def test_identity_compression_identity_hessian_is_gradient_dot_product(setup, tmp_path):
    model, train, query = setup
    idx = gi.build_index(model, train, loss_fn, tmp_path / "id", sparsification="identity",
                         projection="identity", hessian="identity", batch_size=16, progress=False)
    layers = select_layers(model)
    gt = per_sample_gradients(model, collate_all(train), loss_fn, layers)
    gq = per_sample_gradients(model, collate_all(query), loss_fn, layers)
    want = sum(gq[l.name].double() @ gt[l.name].double().T for l in layers)
    got = idx.score(model, query, loss_fn).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert idx.dim == sum(l.numel for l in layers)  # nothing was compressed


def test_faiss_topk_equals_argsort_of_exact_scores(setup, built):
    model, train, query = setup
    idx, _ = built
    s = idx.score(model, query, loss_fn).numpy()
    k = 7
    pro = idx.query(model, query, loss_fn, k=k)
    opp = idx.query(model, query, loss_fn, k=k, opponents=True)
    for r in range(N_QUERY):
        assert [i for i, _ in pro[r]] == list(np.argsort(-s[r], kind="stable")[:k])
        assert [i for i, _ in opp[r]] == list(np.argsort(s[r], kind="stable")[:k])
        np.testing.assert_allclose([v for _, v in pro[r]], np.sort(s[r])[::-1][:k], rtol=1e-5,
                                   atol=1e-6)
        assert all(v < 0 for _, v in opp[r][:1])  # the most negative score is an opponent


def test_reopened_index_gives_same_results(setup, built):
    model, train, query = setup
    idx, out = built
    again = gi.open_index(out)
    torch.testing.assert_close(again.score(model, query, loss_fn), idx.score(model, query, loss_fn))
    assert again.config["n_train"] == N_TRAIN
    assert set(again.config["damping_used"]) == set(again.layout)


def test_sign_convention_self_influence_is_positive(setup, built):
    """Up-weighting an example lowers its own loss: its self-score must be a proponent (> 0)."""
    model, train, _ = setup
    idx, _ = built
    sub = [train[i] for i in range(10)]
    s = idx.score(model, sub, loss_fn)
    assert (torch.diagonal(s) > 0).all()


def test_reprecondition_reuses_sketches(setup, tmp_path, monkeypatch):
    model, train, query = setup
    calls = {"n": 0}
    orig = GradientSketcher.sketch

    def counting(self, batch, fn):
        calls["n"] += 1
        return orig(self, batch, fn)

    monkeypatch.setattr(GradientSketcher, "sketch", counting)
    out = tmp_path / "rp"
    gi.build_index(model, train, loss_fn, out, sparsification=SPARS, projection=PROJ,
                   batch_size=8, progress=False)
    n_build = calls["n"]
    assert n_build == 6  # ceil(45 / 8) batches
    g, layout, _ = exact_sketches(model, train, SPARS, PROJ)
    q, _, _ = exact_sketches(model, query, SPARS, PROJ)
    # same out, other damping: no new gradient batch is sketched
    idx = gi.build_index(model, train, loss_fn, out, sparsification=SPARS, projection=PROJ,
                         batch_size=8, damping=1.0, progress=False)
    assert calls["n"] == n_build
    assert idx.config["damping"] == "1.0"
    calls["n"] = 0
    got = idx.score(model, query, loss_fn).double()
    want = brute_force_scores(q, g, layout, 1.0)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5 * want.abs().max().item())
    # ... and through the API on an opened index
    idx = gi.open_index(out).reprecondition(damping="abs:0.5")
    assert calls["n"] == 1  # only the score call above sketched queries
    lam = idx.config["damping_used"]
    assert all(abs(v - 0.5) < 1e-12 for v in lam.values())
    assert gi.open_index(out).config["damping"] == "abs:0.5"
    # earlier variants are cleaned up: one preconditioner (its state + each layer's form's
    # arrays, and the exact scan's saturated blocks) remains, and no FAISS file: the exact
    # index is the store's rows
    from grass_index.precondition.forms import FORMS
    from grass_index.store import SketchStore
    key = idx.config['preconditioner_key']
    forms = idx.config["preconditioner"]["forms"]
    with SketchStore.open(out / "sketches") as store:
        assert sorted(n for n in store.array_names() if n.startswith("precond/")) == sorted(
            [f"precond/{key}/state", f"precond/{key}/saturated"] + [
                f"precond/{key}/{a}/{name}" for name in idx.layout
                for a in FORMS[forms[name]].names])
    assert idx.settings.held_in_store and idx.config["index_file"] is None
    assert list(out.glob("index-*.faiss")) == []


def test_query_refuses_model_with_other_shapes(built):
    idx, _ = built
    other = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    with pytest.raises(ValueError, match="built with"):
        idx.query(other, make_data(2, 3), loss_fn)


def test_query_refuses_wrong_shaped_examples(built, setup):
    model, _, _ = setup
    idx, _ = built
    bad = torch.utils.data.TensorDataset(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected shape \[6\], got \[5\]"):
        idx.query(model, bad, loss_fn)


def test_nan_gradient_names_train_id_and_layer(setup, tmp_path):
    model, train, _ = setup
    x, y = train.tensors
    x = x.clone()
    x[13, 2] = float("nan")
    with pytest.raises(ValueError, match=r"training example 13 .*layer"):
        gi.build_index(model, torch.utils.data.TensorDataset(x, y), loss_fn, tmp_path / "nan",
                       sparsification=SPARS, projection=PROJ, batch_size=8, progress=False)


def test_scalar_loss_is_refused_before_any_write(setup, tmp_path):
    model, train, _ = setup
    with pytest.raises(ValueError, match="one loss per example"):
        gi.build_index(model, train, lambda m, b: loss_fn(m, b).mean(), tmp_path / "s",
                       progress=False)
    assert not (tmp_path / "s").exists()


def test_unknown_layer_pattern(setup, tmp_path):
    model, train, _ = setup
    with pytest.raises(ValueError, match="matches no parameter"):
        gi.build_index(model, train, loss_fn, tmp_path / "l", layers=["nope.*"], progress=False)
    assert not (tmp_path / "l").exists()


def test_out_dir_with_different_build_is_refused(setup, built):
    model, train, _ = setup
    _, out = built
    with pytest.raises(ValueError, match=r"different build \(differs in: seed\)"):
        gi.build_index(model, train, loss_fn, out, sparsification=SPARS, projection=PROJ,
                       batch_size=8, seed=1, progress=False)


def test_layers_glob_selects_subset(setup, tmp_path):
    model, train, query = setup
    idx = gi.build_index(model, train, loss_fn, tmp_path / "g", layers="2.*",
                         sparsification="identity", projection="identity", hessian="identity",
                         progress=False)
    assert list(idx.layout) == ["2"] and idx.dim == 3 * 6
    layers = select_layers(model, ["2.*"])
    gt = per_sample_gradients(model, collate_all(train), loss_fn, layers)["2"].double()
    gq = per_sample_gradients(model, collate_all(query), loss_fn, layers)["2"].double()
    torch.testing.assert_close(idx.score(model, query, loss_fn).double(), gq @ gt.T,
                               rtol=1e-4, atol=1e-6)


def test_ivf_index_finds_exact_top1_on_small_set(setup, tmp_path):
    model, train, query = setup
    idx = gi.build_index(model, train, loss_fn, tmp_path / "ivf", sparsification=SPARS,
                         projection=PROJ, index="ivf", nlist=2, nprobe=2, progress=False)
    s = idx.score(model, query, loss_fn).numpy()
    top = idx.query(model, query, loss_fn, k=1)
    assert [t[0][0] for t in top] == list(s.argmax(1))  # nprobe = nlist: exhaustive
    one = gi.build_index(model, train, loss_fn, tmp_path / "ivf1", sparsification=SPARS,
                         projection=PROJ, index="ivf", nlist=4, nprobe=1, progress=False)
    assert [t[0][0] for t in one.query(model, query, loss_fn, k=1, nprobe=4)] == \
        list(s.argmax(1))  # a query-time nprobe = nlist is exhaustive again
    with pytest.raises(gi.AttributionError, match="nprobe must be a positive integer"):
        one.query(model, query, loss_fn, nprobe=0)


def test_index_records_recall_and_fp16_variants_track_exact_scores(setup, built, tmp_path):
    """Every index records recall@k against exact search in its config (flat: 1.0); an fp16
    index, made here by repreconditioning a copy, answers like the exact one within float16
    rounding and survives a reopen (the scale travels with the file)."""
    import shutil

    model, train, query = setup
    idx, out = built
    rec = idx.config["index"]["recall"]
    assert rec["recall"] == 1.0 and rec["k"] == 10 and rec["queries"] == N_TRAIN
    s = idx.score(model, query, loss_fn).numpy()
    shutil.copytree(out, tmp_path / "c")
    for spec in ("flat:fp16", "ivf:fp16"):
        half = gi.open_index(tmp_path / "c").reprecondition(index=spec)
        assert half.config["index_kind"] == spec and half.config["index"]["dtype"] == "float16"
        assert half.config["index"]["recall"]["recall"] >= 0.9
        top = gi.open_index(tmp_path / "c").query(model, query, loss_fn, k=5)
        for r in range(N_QUERY):
            ids = [i for i, _ in top[r]]
            np.testing.assert_allclose([v for _, v in top[r]], s[r, ids], rtol=2e-3,
                                       atol=2e-3 * np.abs(s).max())
            assert s[r, ids[0]] >= s[r].max() - 4e-3 * np.abs(s).max()
    with pytest.raises(gi.AttributionError, match="flat:fp16"):
        gi.open_index(tmp_path / "c").reprecondition(index="flat:fp8")


def test_sharded_index_files_answer_like_one_and_are_verified_and_repaired(setup, built,
                                                                          tmp_path):
    """index='flat:shards=3' writes three part files searched as one: the same top-k and scores
    as the one-file index; verify checks them and --repair rebuilds a lost part; going back to
    one file removes the parts."""
    import shutil

    model, train, query = setup
    idx, out = built
    shutil.copytree(out, tmp_path / "c")
    sharded = gi.open_index(tmp_path / "c").reprecondition(index="flat:shards=3")
    names = sharded.config["index_files"]
    assert len(names) == 3 and sorted(p.name for p in (tmp_path / "c").glob("index-*")) == \
        sorted(names)
    assert sharded.config["index"]["parts"] == 3 and sharded.config["index"]["ntotal"] == N_TRAIN
    assert sharded.config["index"]["recall"]["recall"] == 1.0
    want = idx.query(model, query, loss_fn, k=N_TRAIN)  # every id: all parts contribute
    got = gi.open_index(tmp_path / "c", mmap=True).query(model, query, loss_fn, k=N_TRAIN)
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    np.testing.assert_allclose([[v for _, v in r] for r in got],
                               [[v for _, v in r] for r in want], rtol=1e-5, atol=1e-7)
    assert gi.verify_index(tmp_path / "c")["ok"]
    (tmp_path / "c" / names[1]).unlink()
    with pytest.raises(gi.AttributionError, match=r"missing; run `grass_index.verify_index\("):
        gi.open_index(tmp_path / "c").query(model, query, loss_fn)
    rep = gi.verify_index(tmp_path / "c", repair=True)
    assert rep["ok"] and rep["repaired"]
    assert len(gi.open_index(tmp_path / "c").query(model, query, loss_fn, k=3)) == N_QUERY
    one = gi.open_index(tmp_path / "c").reprecondition(index="flat")
    assert [p.name for p in (tmp_path / "c").glob("index-*")] == one.config["index_files"]


def test_selective_mask_build_is_exact_and_travels_with_the_index(setup, tmp_path):
    """selective_mask specs use the mask file given at build time; queries reuse the copy kept in
    the index directory, and a build with another mask into the same directory is refused."""
    from grass_index.compress import save_selective_mask

    model, train, query = setup
    layers = select_layers(model)
    masks = {layer.name: {"in": torch.tensor([0, 2, layer.d_in_eff - 1]), "out": torch.tensor([1, 0])}
             for layer in layers}
    mask_file = tmp_path / "mask.pt"
    save_selective_mask(mask_file, masks)
    out = tmp_path / "sel"
    gi.build_index(model, train, loss_fn, out, sparsification="selective_mask-3*2",
                   projection="identity", batch_size=8, progress=False, selective_mask=mask_file)
    mask_file.unlink()  # the index must not depend on the original file

    def masked(data):
        grads = per_sample_gradients(model, collate_all(data), loss_fn, layers)
        parts = []
        for layer in layers:
            G = grads[layer.name].double().reshape(len(data), layer.d_out, layer.d_in_eff)
            m = masks[layer.name]
            parts.append(G[:, m["out"]][:, :, m["in"]].reshape(len(data), -1))
        return torch.cat(parts, 1)

    layout = {layer.name: 6 for layer in layers}
    want = brute_force_scores(masked(query), masked(train), layout, DEFAULT_DAMPING)
    got = gi.open_index(out).score(model, query, loss_fn).double()
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5 * want.abs().max().item())

    other = {name: {"in": m["in"], "out": torch.tensor([2, 0])} for name, m in masks.items()}
    save_selective_mask(tmp_path / "other.pt", other)
    with pytest.raises(ValueError, match="selective_mask"):
        gi.build_index(model, train, loss_fn, out, sparsification="selective_mask-3*2",
                       projection="identity", batch_size=8, progress=False,
                       selective_mask=tmp_path / "other.pt")


def test_query_refuses_projections_drawn_differently(built, setup, monkeypatch):
    """Same sizes, different projections (e.g. a library that seeds layers differently): the
    recorded fingerprint catches it instead of returning silently wrong scores."""
    idx, _ = built
    model, _, query = setup
    idx.query(model, query, loss_fn, k=3)  # the building version is accepted
    import grass_index.capture.sketcher as sketcher_mod
    monkeypatch.setattr(sketcher_mod, "layer_seed", lambda seed, name: 12345)
    with pytest.raises(ValueError, match="projections drawn now .* differ"):
        idx.query(model, query, loss_fn, k=3)


def test_rerun_reuses_the_stored_preconditioner(setup, tmp_path, monkeypatch):
    """Pass 2 re-run with the same settings (e.g. resumed after a kill) loads the stored
    inverses instead of refitting them (a Cholesky per layer: seconds at k=4096)."""
    from grass_index.precondition import Preconditioner

    model, train, query = setup
    out = tmp_path / "reuse"
    first = gi.build_index(model, train, loss_fn, out, sparsification=SPARS, projection=PROJ,
                           batch_size=8, progress=False)
    want = first.score(model, query, loss_fn)

    def no_fit(*a, **k):
        raise AssertionError("preconditioner refitted although it is stored")

    monkeypatch.setattr(Preconditioner, "fit", no_fit)
    again = gi.build_index(model, train, loss_fn, out, sparsification=SPARS, projection=PROJ,
                           batch_size=8, progress=False)
    torch.testing.assert_close(again.score(model, query, loss_fn), want)
