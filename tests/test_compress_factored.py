"""Factored compressors equal (C_out kron C_in) applied to vec(G) without ever forming G,
and the linear-layer interface (shapes, dtypes, seeds, state dicts) holds for every kind."""
import pytest
import torch

from grass_index.compress import FactGraSS, GraSS, LoGra, make_compressor
from grass_index.compress.factored import FactoredCompressor, MaterializedLinearCompressor

FACTORED = [("random_mask-6*5", "sjlt-16"), ("normal-6*5", "identity"), ("rademacher-6*5", "fjlt-16"),
            ("sjlt-6*5:s=2", "normal-16"), ("fjlt-6*5", "grass-8"), ("random_mask-6*5", "random_mask-20"),
            ("identity-12*9", "sjlt-16")]
D_IN, D_OUT = 12, 9


def data(B=3, T=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, D_IN, generator=g).to(dtype), torch.randn(B, T, D_OUT, generator=g).to(dtype))


@pytest.mark.parametrize("spars,proj", FACTORED)
def test_factored_equals_kronecker_of_factors(spars, proj):
    c = make_compressor(spars, proj, d_in=D_IN, d_out=D_OUT, seed=7)
    assert isinstance(c, FactoredCompressor)
    x, g = data()
    G = torch.einsum("bto,bti->boi", g, x).reshape(3, -1)          # exact per-sample gradients
    K = torch.kron(c.compress_out.dense_matrix(), c.compress_in.dense_matrix())  # [d_out*d_in, a*b]
    torch.testing.assert_close(c(x, g), c.project(G @ K), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spars,proj", FACTORED)
def test_sum_over_tokens_and_linearity(spars, proj):
    c = make_compressor(spars, proj, d_in=D_IN, d_out=D_OUT, seed=1)
    x, g = data()
    per_token = sum(c(x[:, t], g[:, t]) for t in range(x.shape[1]))  # [B, d] inputs: T absent
    torch.testing.assert_close(c(x, g), per_token, rtol=1e-4, atol=1e-5)
    x2, g2 = data(seed=1)
    both = c(torch.cat([x, x2], 1), torch.cat([g, g2], 1))          # repeated calls of a layer
    torch.testing.assert_close(both, c(x, g) + c(x2, g2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spars,proj", FACTORED)
def test_factored_seeded_and_state_dict(spars, proj):
    x, g = data()
    a = make_compressor(spars, proj, d_in=D_IN, d_out=D_OUT, seed=3)
    b = make_compressor(spars, proj, d_in=D_IN, d_out=D_OUT, seed=3)
    other = make_compressor(spars, proj, d_in=D_IN, d_out=D_OUT, seed=4)
    assert torch.equal(a(x, g), b(x, g))
    if not spars.startswith("identity") or proj != "identity":
        assert not torch.equal(a(x, g), other(x, g))
    assert list(a.parameters()) == []
    other.load_state_dict(a.state_dict())
    assert torch.equal(a(x, g), other(x, g))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_factored_half_inputs(dtype):
    c = FactGraSS(D_IN, D_OUT, "random_mask-6*5", "sjlt-16")
    x, g = data(dtype=dtype)
    out = c(x, g)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, c(x.float(), g.float()), rtol=1e-5, atol=1e-5)


def test_named_classes_defaults_and_describe():
    f, l_, g = FactGraSS(768, 3072), LoGra(768, 3072), GraSS(100_000)
    assert f.k == l_.k == g.k == 4096
    assert f.describe() == {"sparsification": "random_mask-128*128", "projection": "sjlt-4096", "k": 4096,
                            "clamped": []}
    assert l_.describe()["sparsification"] == "normal-64*64" and l_.describe()["projection"] == "identity"
    assert g.describe()["sparsification"] == "random_mask-16384"
    with pytest.raises(ValueError, match="not factored"):
        FactGraSS(768, 3072, "random_mask-4096")


def test_non_factored_spec_on_linear_materialises():
    c = make_compressor("random_mask-40", "sjlt-10", d_in=D_IN, d_out=D_OUT, seed=2)
    assert isinstance(c, MaterializedLinearCompressor) and c.k == 10
    flat = make_compressor("random_mask-40", "sjlt-10", d=D_IN * D_OUT, seed=2)
    x, g = data()
    G = torch.einsum("bto,bti->boi", g, x).reshape(3, -1)
    torch.testing.assert_close(c(x, g), flat(G), rtol=1e-4, atol=1e-5)
    assert c.describe() == flat.describe()


@pytest.mark.parametrize("x_shape,g_shape,needle", [
    ((3, 4, 11), (3, 4, 9), "x must be"),
    ((3, 4, 12), (3, 4), "grad_out must be"),
    ((3, 4, 12), (3, 5, 9), "must agree"),
    ((3, 4, 12), (2, 4, 9), "must agree"),
])
def test_linear_shape_errors(x_shape, g_shape, needle):
    c = FactGraSS(D_IN, D_OUT, "random_mask-6*5", "sjlt-16")
    with pytest.raises(ValueError, match=needle):
        c(torch.randn(x_shape), torch.randn(g_shape))


def test_flat_shape_error():
    with pytest.raises(ValueError, match=r"\[batch, 1000\]"):
        GraSS(1000, "random_mask-100", "sjlt-10")(torch.randn(3, 999))


def test_buffers_move_with_to():
    c = FactGraSS(D_IN, D_OUT, "random_mask-6*5", "sjlt-16").to("meta")
    assert all(b.device.type == "meta" for b in c.buffers())
