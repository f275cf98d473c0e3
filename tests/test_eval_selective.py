"""Selective Mask fitting keeps the coordinates that carry the attribution scores."""
import pytest
import torch
from torch import nn

from grass_index.maskfit import fit_selective_mask


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g) * 0.01
    x[:, [1, 4, 6]] *= 1000.0          # three input features carry almost all the signal
    y = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3))
    data = list(zip(x, y))

    def loss(m, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(m(xb), yb, reduction="none")

    return model, data, loss


@pytest.fixture(scope="module")
def factored():
    model, data, loss = _setup()
    return fit_selective_mask(model, data, loss, "3*2", n_samples=64, steps=100,
                              hessian="identity")


def test_factored_mask_finds_the_informative_inputs(factored):
    masks = factored     # raw inner products (identity Hessian): the big inputs carry them
    assert set(masks) == {"0"}
    assert masks["0"]["in"].tolist() == [1, 4, 6]
    assert len(masks["0"]["out"]) == 2 and masks["0"]["out"].dtype == torch.long


def test_flat_mask_and_clamping():
    model, data, loss = _setup()
    masks = fit_selective_mask(model, data, loss, 1000, n_samples=8, steps=2)
    assert masks["0"]["flat"].tolist() == list(range(27))  # 3 x (8 + bias): clamped to all
    masks = fit_selective_mask(model, data, loss, 9, n_samples=64, steps=100, hessian="identity")
    kept_inputs = {int(i) % 9 for i in masks["0"]["flat"]}   # row-major [d_out, d_in + bias]
    assert kept_inputs == {1, 4, 6}


def test_efim_mask_skips_redundant_coordinates():
    """Inputs 0-2 are copies of one strong signal, input 3 an independent weaker one. Raw
    magnitude would keep two copies; for preconditioned (eFIM) scores a second copy adds
    nothing after whitening, so the fit keeps one copy and the independent input."""
    g = torch.Generator().manual_seed(0)
    n = 96
    x = torch.randn(n, 8, generator=g) * 0.01
    s = torch.randn(n, generator=g)
    x[:, 0], x[:, 2] = 3 * s, 3 * s
    x[:, 1] = 3 * s + 0.01 * torch.randn(n, generator=g)
    x[:, 3] = torch.randn(n, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3, bias=False))

    def loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    # a relative damping: with two real directions "auto" (30 × the floor, here the weaker
    # signal's own eigenvalue) damps the whitening this test is about almost away
    masks = fit_selective_mask(model, list(zip(x, y)), loss, "2*3", n_samples=n, steps=100,
                               damping=0.3)
    kept = set(masks["0"]["in"].tolist())
    assert 3 in kept and len(kept & {0, 1, 2}) == 1


def test_bad_hessian_and_damping():
    model, data, loss = _setup()
    with pytest.raises(ValueError, match="hessian"):
        fit_selective_mask(model, data, loss, 4, hessian="kfac")
    with pytest.raises(ValueError, match="relative damping"):
        fit_selective_mask(model, data, loss, 4, damping="abs:1e-3")


def test_mask_round_trips_through_the_mask_file(tmp_path, factored):
    from grass_index.compress import load_selective_mask, save_selective_mask

    masks = factored
    save_selective_mask(tmp_path / "m.pt", masks)
    back = load_selective_mask(tmp_path / "m.pt")
    assert torch.equal(back["0"]["in"], masks["0"]["in"])


@pytest.mark.parametrize("k", ["0", "a*b", "1*2*3", -4])
def test_bad_k(k):
    model, data, loss = _setup()
    with pytest.raises(ValueError, match="selective mask size"):
        fit_selective_mask(model, data, loss, k)


def test_cli_fit_writes_a_mask_file(tmp_path):
    import typer
    from typer.testing import CliRunner

    from grass_index.cli.selective_cmd import register
    from grass_index.compress import load_selective_mask

    (tmp_path / "t.py").write_text(
        "import torch\nfrom torch import nn\n"
        "X = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))\n"
        "Y = torch.arange(16) % 2\n"
        "def model():\n    torch.manual_seed(0)\n    return nn.Linear(5, 2)\n"
        "def train_data():\n    return list(zip(X, Y))\n"
        "def loss(m, b):\n    return nn.functional.cross_entropy(m(b[0]), b[1], reduction='none')\n")
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["selective-mask", "fit", str(tmp_path / "t.py"), "--out",
                                 str(tmp_path / "m.pt"), "--k", "2*2", "--steps", "5"])
    assert r.exit_code == 0, r.output
    assert "keeps 2*2" in r.output
    ((entry_name, entry),) = load_selective_mask(tmp_path / "m.pt").items()
    assert len(entry["in"]) == 2 and len(entry["out"]) == 2
    r = CliRunner().invoke(app, ["selective-mask", "fit", str(tmp_path / "t.py"), "--out",
                                 str(tmp_path / "m.pt"), "--k", "x"])
    assert r.exit_code == 1 and "selective mask size" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["selective-mask", "fit", str(tmp_path / "t.py"), "--out",
                                 str(tmp_path / "m2.pt"), "--k", "2*2", "--steps", "3",
                                 "--batch-size", "5", "--memory-gb", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    import json
    doc = json.loads(r.stdout)
    assert doc == {"out": str(tmp_path / "m2.pt"), "layers": {entry_name: {"in": 2, "out": 2}},
                   "passes": 1}
    r = CliRunner().invoke(app, ["selective-mask", "fit", str(tmp_path / "t.py"), "--out",
                                 str(tmp_path / "m2.pt"), "--k", "2", "--memory-gb", "0"])
    assert r.exit_code == 1 and "--memory-gb 0" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


# --- the per-layer factored fit (linear layers from per-token factors, streamed) ---------------

def _seq_setup(n=48, T=5):
    """A tiny 2-layer MLP applied per token: its weight gradients are sums over T tokens, so the
    factored route has T > 1 (the tiny digits-style MLP above has T = 1)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, T, 6, generator=g)
    x[..., 2] *= 5.0
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))

    def loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]).mean(1), batch[1], reduction="none")

    return model, list(zip(x, y)), loss


@pytest.mark.parametrize("hessian", ["eFIM", "identity"])
def test_factored_fit_equals_the_exact_fit(hessian):
    """Same sample, same init, same objective: the factored route (gradients formed from
    per-token factors, block by block, streamed in several passes under a tiny budget) gives
    the masks and final objective of the exact route (formed per-example gradients)."""
    model, data, loss = _seq_setup()
    kw = dict(n_samples=48, steps=40, hessian=hessian, batch_size=10)
    s_exact, s_fact = {}, {}
    exact = fit_selective_mask(model, data, loss, "3*2", capture="exact", stats=s_exact, **kw)
    fact = fit_selective_mask(model, data, loss, "3*2", capture="factors", stats=s_fact,
                              memory_gb=18000 / 2 ** 30, **kw)   # a pass per layer, blocks of 11
    assert s_fact["passes"] == 2 and s_fact["0"]["route"] == "factors"
    assert s_exact["0"]["route"] == "exact"
    for name in ("0", "2"):
        assert torch.equal(exact[name]["in"], fact[name]["in"])
        assert torch.equal(exact[name]["out"], fact[name]["out"])
        assert s_fact[name]["fit"] == pytest.approx(s_exact[name]["fit"], rel=1e-3, abs=1e-5)
    # factors hold T·(d_in+1 + d_out) numbers per example, the exact route d_out·(d_in+1)
    assert s_fact["0"]["held_bytes"] == 48 * 5 * (7 + 7) * 4
    assert s_exact["0"]["held_bytes"] == 48 * 7 * 7 * 4


def test_blockwise_gram_and_its_gradient_match_autograd():
    """The streamed Gram (custom backward, blocks re-formed from factors) against plain
    autograd on the formed gradients."""
    from grass_index.capture.factors import LayerBatch
    from grass_index.maskfit.gram import LayerGrads

    g = torch.Generator().manual_seed(0)
    parts = [LayerBatch(x=torch.randn(b, 4, 5, generator=g), dy=torch.randn(b, 4, 3, generator=g))
             for b in (3, 4, 2)]
    formed = torch.cat([torch.einsum("bto,bti->boi", p.dy, p.x).reshape(p.size, -1) for p in parts])
    lg = LayerGrads("L", parts, (3, 5), budget=8 * 15 * 4 * 2)     # blocks of 2 examples
    assert lg.chunk == 2 and lg.full is None
    ref = formed.double() * lg.scale
    w2 = torch.rand(15, generator=g, dtype=torch.float32, requires_grad=True)
    w2d = w2.detach().double().requires_grad_(True)
    K = lg.gram(w2, 9, 3)
    Kd = ref[:9] @ (ref[3:] * w2d).T
    assert torch.allclose(K.double(), Kd, rtol=1e-4, atol=1e-4)
    gamma = torch.randn(9, 6, generator=g)
    (K * gamma).sum().backward()
    (Kd * gamma.double()).sum().backward()
    assert torch.allclose(w2.grad.double(), w2d.grad, rtol=1e-4, atol=1e-3)


def test_factored_fit_bad_options():
    model, data, loss = _setup()
    with pytest.raises(ValueError, match="capture"):
        fit_selective_mask(model, data, loss, 4, capture="fast")
    with pytest.raises(ValueError, match="memory_gb"):
        fit_selective_mask(model, data, loss, 4, memory_gb=0)


def test_auto_capture_picks_factors_only_over_budget():
    model, data, loss = _seq_setup()
    small, big = {}, {}
    fit_selective_mask(model, data, loss, "3*2", n_samples=48, steps=1, stats=small)
    fit_selective_mask(model, data, loss, "3*2", n_samples=48, steps=1, stats=big,
                       memory_gb=10000 / 2 ** 30)   # formed: 48 × (49 + 24) × 4 = 14016 bytes
    assert small["0"]["route"] == "exact" and big["0"]["route"] == "factors"


def test_options_object_and_keyword_settings_agree():
    """A MaskFitOptions, the same settings as keywords, and keywords on top of an options
    object give the same masks; an unknown setting is refused by name."""
    from grass_index.maskfit import MaskFitError, MaskFitOptions

    model, data, loss = _setup()
    opts = MaskFitOptions(n_samples=48, steps=20, hessian="identity", seed=3)
    a = fit_selective_mask(model, data, loss, "3*2", opts)
    b = fit_selective_mask(model, data, loss, "3*2", n_samples=48, steps=20, hessian="identity",
                           seed=3)
    c = fit_selective_mask(model, data, loss, "3*2", MaskFitOptions(steps=20), n_samples=48,
                           hessian="identity", seed=3)
    for other in (b, c):
        assert all(torch.equal(a["0"][key], other["0"][key]) for key in ("in", "out"))
    with pytest.raises(MaskFitError, match=r"unknown mask-fit setting\(s\) \['step'\]"):
        fit_selective_mask(model, data, loss, 4, step=3)
