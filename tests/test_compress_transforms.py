"""Each transform: equals its dense matrix, is unbiased (JL on random vectors), seeded,
state-dict round-trips, and handles half-precision inputs."""
import contextlib
import io
import math
import pathlib
import subprocess
import sys

import pytest
import scipy.linalg
import torch

from grass_index.compress import FJLT, SJLT, make_compressor, fwht
from grass_index.compress.seeding import generator

FLAT_SPECS = ["identity", "normal-48", "rademacher-48", "sjlt-48", "sjlt-48:s=3", "fjlt-48",
              "random_mask-48", "grass-24", "grass-16:mask=40,s=2"]


def flat(spec, d=100, seed=0, **kw):
    return make_compressor(spec, "identity", d=d, seed=seed, **kw)


@pytest.mark.parametrize("spec", FLAT_SPECS)
def test_equals_dense_matrix(spec):
    c = flat(spec, d=100)
    M = c.sparsify.dense_matrix()      # sketch of the e_i columns
    assert M.shape == (100, c.k)
    x = torch.randn(7, 100, dtype=torch.float32)
    torch.testing.assert_close(c(x), x @ M, rtol=1e-5, atol=1e-5)
    # linear in the gradient: sketch of a sum is the sum of sketches
    torch.testing.assert_close(c(x[:3] + x[3:6]), c(x[:3]) + c(x[3:6]), rtol=1e-5, atol=1e-5)


def test_fwht_matches_hadamard_matrix():
    for D in (1, 2, 8, 64):
        x = torch.randn(3, D, dtype=torch.float64)
        H = torch.from_numpy(scipy.linalg.hadamard(D)).double()
        torch.testing.assert_close(fwht(x), x @ H)


def test_fjlt_is_signed_hadamard_rows_with_padding():
    d, k = 20, 8  # pads to 32
    t = FJLT(d, k, generator(3, "x"))
    H = torch.from_numpy(scipy.linalg.hadamard(32)).float()
    expected = (torch.diag(t.sign) @ H[:d])[:, t.rows] / math.sqrt(k)
    torch.testing.assert_close(t.dense_matrix(), expected)


def test_sjlt_structure():
    t = SJLT(50, 16, generator(0, "x"), s=4)
    M = t.dense_matrix()
    # each input coordinate touches at most s buckets, entries are +-1/sqrt(s) (or sums on collision)
    assert ((M != 0).sum(1) <= 4).all()
    assert torch.allclose((M * 2).round(), M * 2)  # multiples of 1/sqrt(4)=1/2


def _jl_error(spec, k, d=2048, n=24, seeds=(0,)):
    """Mean over pairs of |<Cx,Cy> - <x,y>| / (|x||y|) for random vectors."""
    g = torch.Generator().manual_seed(123)
    X = torch.randn(n, d, generator=g) * torch.rand(d, generator=g)  # uneven coordinate scales
    K = X @ X.T
    norm = K.diag().sqrt()
    errs = []
    for s in seeds:
        S = flat(spec.format(k=k), d=d, seed=s)(X)
        errs.append(((S @ S.T - K).abs() / torch.outer(norm, norm)).mean())
    return float(torch.stack(errs).mean())


# Stated tolerance: mean normalised inner-product error <= 1.5/sqrt(k) (Gaussian theory gives
# about 0.8*sqrt(2/k)), and it must shrink at least 2.5x from k=256 to k=4096 (theory: 4x).
@pytest.mark.parametrize("spec", ["normal-{k}", "rademacher-{k}", "sjlt-{k}", "sjlt-{k}:s=4", "fjlt-{k}",
                                  "grass-{k}"])
def test_jl_random_vectors(spec):
    d = 8192
    e_small, e_big = _jl_error(spec, 256, d=d), _jl_error(spec, 4096, d=d)
    assert e_small <= 1.5 / math.sqrt(256), e_small
    assert e_big <= 1.5 / math.sqrt(4096), e_big
    assert e_big < e_small / 2.5


def test_random_mask_unbiased():
    # A mask's error depends on k'/d, not on k alone: check the mean over seeds is unbiased
    # and the error shrinks as more coordinates are kept.
    e_small = _jl_error("random_mask-{k}", 256, d=8192, seeds=range(3))
    e_big = _jl_error("random_mask-{k}", 4096, d=8192, seeds=range(3))
    assert e_big < e_small / 2.5 and e_small < 1.5 / math.sqrt(256)
    X = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    est = torch.stack([flat("random_mask-30", d=300, seed=s)(X).pow(2).sum(1) for s in range(400)]).mean(0)
    torch.testing.assert_close(est, X.pow(2).sum(1), rtol=0.05, atol=0)


@pytest.mark.parametrize("spec", FLAT_SPECS[1:])
def test_seeded(spec):
    x = torch.randn(3, 100)
    a, b, c = flat(spec, seed=5)(x), flat(spec, seed=5)(x), flat(spec, seed=6)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("spec", FLAT_SPECS)
def test_state_dict_round_trip_and_buffers_only(spec):
    src, dst = flat(spec, seed=1), flat(spec, seed=2)
    assert list(src.parameters()) == []
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 100)
    assert torch.equal(src(x), dst(x))


SCRIPT = """
import hashlib, torch
from grass_index.compress import make_compressor
c = make_compressor("random_mask-16*16", "sjlt-64", d_in=40, d_out=50, seed=9)
l = make_compressor("normal-8*8", "fjlt-32", d_in=40, d_out=50, seed=9)
h = hashlib.sha256()
for m in (c, l):
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def test_deterministic_across_processes():
    root = str(pathlib.Path(__file__).resolve().parents[1])
    other = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                           cwd=root).stdout
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(SCRIPT, {})
    assert other == buf.getvalue() and len(other.strip()) == 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["normal-48", "sjlt-48", "fjlt-48", "random_mask-48", "grass-24"])
def test_half_inputs_give_float32(spec, dtype):
    c = flat(spec)
    x = torch.randn(5, 100).to(dtype)
    out = c(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, c(x.float()), rtol=1e-5, atol=1e-5)
