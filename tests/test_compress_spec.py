"""Spec language, seeds, and the error messages of the factory."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from grass_index.compress import KINDS, Spec, layer_seed, load_selective_mask, make_compressor, parse_spec
from grass_index.compress.selective import save_selective_mask


@pytest.mark.parametrize("text,spec", [
    ("identity", Spec("identity", ())),
    ("sjlt-4096", Spec("sjlt", (4096,))),
    ("sjlt-4096:s=4", Spec("sjlt", (4096,), s=4)),
    ("random_mask-128*64", Spec("random_mask", (128, 64))),
    ("grass-4096:mask=16384,s=2", Spec("grass", (4096,), s=2, mask=16384)),
    ("Normal-64*64", Spec("normal", (64, 64))),
])
def test_parse_examples(text, spec):
    got = parse_spec(text)
    assert got == spec
    assert got.factored == (len(spec.dims) == 2)
    assert parse_spec(str(got)) == got


@st.composite
def specs(draw):
    kind = draw(st.sampled_from(KINDS))
    if kind == "identity" and draw(st.booleans()):
        return Spec("identity", ())
    factored = kind != "grass" and draw(st.booleans())
    dims = tuple(draw(st.lists(st.integers(1, 10**6), min_size=1 + factored, max_size=1 + factored)))
    s = draw(st.integers(1, 8)) if kind in ("sjlt", "grass") else 1
    mask = draw(st.one_of(st.none(), st.integers(dims[0], 10**7))) if kind == "grass" else None
    return Spec(kind, dims, s, mask)


@given(specs())
def test_str_round_trips(spec):
    assert parse_spec(str(spec)) == spec
    assert str(parse_spec(str(spec))) == str(spec)


@pytest.mark.parametrize("text,needle", [
    ("gaussian-64", "unknown type 'gaussian'"),
    ("sjlt", "needs a target dimension"),
    ("sjlt-", "not of the form"),
    ("sjlt-64*", "not of the form"),
    ("sjlt-0", "positive"),
    ("sjlt--5", "not of the form"),
    ("sjlt-64:q=3", "option 'q' is not valid"),
    ("sjlt-64:s=0", "positive integer"),
    ("normal-64:s=2", "not valid for 'normal'"),
    ("grass-64*64", "cannot be factored"),
    ("grass-64:mask=8", "smaller than the output dim"),
    ("sjlt-1*2*3", "not of the form"),
])
def test_parse_errors(text, needle):
    with pytest.raises(ValueError, match="bad compression spec") as e:
        parse_spec(text)
    assert needle in str(e.value)


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        parse_spec("countsketch-10")
    assert all(k in str(e.value) for k in KINDS)


def test_layer_seed_is_stable_and_distinct():
    # crc32-based: a fixed value on every machine and process (Python's hash() is salted).
    assert layer_seed(0, "fc1") == layer_seed(0, "fc1") == 734124178
    assert len({layer_seed(s, n) for s in range(3) for n in ("fc1", "fc2", "h.0.attn")}) == 9
    with pytest.raises(ValueError, match="seed must be an int"):
        layer_seed("0", "fc1")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sparsification="random_mask-128*128", projection="sjlt-64", d=1000), "needs a linear layer"),
    (dict(sparsification="random_mask-2000", projection="identity", d=1000), "input dim is only 1000"),
    (dict(sparsification="random_mask-64*64", projection="identity", d_in=32, d_out=128), "d_in=32"),
    (dict(sparsification="random_mask-16*16", projection="sjlt-1000", d_in=32, d_out=128), "only 256"),
    (dict(sparsification="random_mask-16*16", projection="sjlt-8*8", d_in=32, d_out=32), "must be flat"),
    (dict(sparsification="identity-10", projection="identity", d=20), "must equal the input dim 20"),
    (dict(sparsification="grass-10:mask=50", projection="identity", d=20), "mask of 50"),
    (dict(sparsification="sjlt-10", projection="identity"), "needs the parameter shape"),
    (dict(sparsification="sjlt-10", projection="identity", d=0), "d must be a positive int"),
    (dict(sparsification="sjlt-10", projection="identity", d=20, d_in=4, d_out=5), "not both"),
    (dict(sparsification="selective_mask-4", projection="identity", d=20), "needs mask_indices"),
    (dict(sparsification="selective_mask-4", projection="identity", d=20,
          mask_indices={"flat": torch.tensor([0, 1, 2])}), "has 3"),
    (dict(sparsification="selective_mask-3", projection="identity", d=20,
          mask_indices={"flat": torch.tensor([0, 1, 20])}), "must lie in [0, 20)"),
    (dict(sparsification="selective_mask-3", projection="identity", d=20,
          mask_indices={"flat": torch.tensor([0, 1, 1])}), "duplicates"),
    (dict(sparsification="selective_mask-2*2", projection="identity", d_in=4, d_out=4,
          mask_indices={"flat": torch.tensor([0, 1])}), "key 'in'"),
])
def test_factory_errors(kwargs, needle):
    with pytest.raises(ValueError) as e:
        make_compressor(**kwargs)
    assert needle in str(e.value)


def test_dim_error_names_layer_and_spec():
    with pytest.raises(ValueError) as e:
        make_compressor("random_mask-128*128", "sjlt-4096", d_in=64, d_out=256, name="blocks.0.fc1")
    msg = str(e.value)
    assert "blocks.0.fc1" in msg and "random_mask-128" in msg and "64" in msg and "clamp=True" in msg


def test_clamp_makes_stages_identity_and_notes_it():
    c = make_compressor("random_mask-128*128", "sjlt-4096", d_in=8, d_out=200, clamp=True)
    d = c.describe()
    assert d["sparsification"] == "identity-8*random_mask-128"
    assert d["projection"] == "identity" and d["k"] == 8 * 128
    assert len(d["clamped"]) == 2 and "d_in=8" in d["clamped"][0]
    d = make_compressor("random_mask-64*64", "sjlt-256", d_in=128, d_out=128, clamp=True).describe()
    assert d == {"sparsification": "random_mask-64*64", "projection": "sjlt-256", "k": 256, "clamped": []}


def test_selective_mask_file_round_trip(tmp_path):
    layers = {"fc1": {"in": torch.tensor([3, 1]), "out": torch.tensor([0, 2, 4])},
              "emb": {"flat": torch.tensor([5, 9, 7])}}
    path = tmp_path / "mask.pt"
    save_selective_mask(path, layers)
    got = load_selective_mask(path)
    assert set(got) == {"fc1", "emb"} and torch.equal(got["fc1"]["out"], layers["fc1"]["out"])
    c = make_compressor("selective_mask-2*3", "identity", d_in=4, d_out=5, mask_indices=got["fc1"])
    x, g = torch.randn(2, 4), torch.randn(2, 5)
    full = (g[:, :, None] * x[:, None, :])
    torch.testing.assert_close(c(x, g), full[:, [0, 2, 4]][:, :, [3, 1]].reshape(2, -1))
    f = make_compressor("selective_mask-3", "identity", d=10, mask_indices=got["emb"])
    v = torch.randn(4, 10)
    torch.testing.assert_close(f(v), v[:, [5, 9, 7]])  # no rescaling


def test_selective_mask_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_selective_mask(tmp_path / "missing.pt")
    torch.save({"fc1": torch.arange(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a selective mask file"):
        load_selective_mask(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="must map to"):
        save_selective_mask(tmp_path / "x.pt", {"fc1": {"in": torch.arange(3)}})
