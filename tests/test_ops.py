"""The compression ops (grass_index.ops.sjlt / mask): values, gradients, errors, compile.

Runs against whichever CPU kernel is active (native when built; tests/test_ops_fallback.py
re-runs this file with GRASS_INDEX_DISABLE_NATIVE=1). CUDA variants compare the device
kernels with the CPU reference and skip without a GPU.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import grass_index as gi
from grass_index.ops.reference import sjlt_reference

sjlt_op = torch.ops.grass_index.sjlt.default
mask_op = torch.ops.grass_index.mask.default


def make(shape, d, k, s=None, dtype=torch.float32, seed=0, device="cpu", sign_dtype=torch.int8):
    """x [*shape, d], idx/sign [d] (s=None) or [s, d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, dtype=torch.float64).to(dtype)
    ishape = (d,) if s is None else (s, d)
    idx = torch.randint(0, k, ishape, generator=g)
    sign = (torch.randint(0, 2, ishape, generator=g) * 2 - 1).to(sign_dtype)
    return x.to(device), idx.to(device), sign.to(device)


def dense_matrix(idx, sign, k):
    """S [d, k] with S[j, idx[r, j]] += sign[r, j]: sjlt(x) == x @ S."""
    d = idx.shape[-1]
    S = torch.zeros(d, k, dtype=torch.float64)
    for r_idx, r_sign in zip(idx.reshape(-1, d).cpu(), sign.reshape(-1, d).cpu()):
        S[torch.arange(d), r_idx] += r_sign.double()
    return S


def sjlt_adjoint(y, idx, sign):
    """S^T y as a signed gather, built from the mask op."""
    d = idx.shape[-1]
    s = idx.shape[0] if idx.dim() == 2 else 1
    g = gi.ops.mask(y, idx.reshape(-1)).reshape(*y.shape[:-1], s, d)
    return (g * sign.reshape(s, d).to(y.dtype)).sum(-2)


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("s", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sjlt_equals_dense_projection(device, s, dtype):
    x, idx, sign = make((4, 3), 300, 17, s=s, dtype=dtype, device=device)
    out = gi.ops.sjlt(x, idx, sign, 17)
    want = x.cpu().double() @ dense_matrix(idx, sign, 17)
    assert out.shape == (4, 3, 17) and out.dtype == dtype and out.device == x.device
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)


def test_sjlt_large_tiles_match_reference():
    # d larger than the CPU kernel's column tile, rows not a multiple of its row group,
    # and structured zeros (whole column blocks) that the kernel skips.
    x, idx, sign = make((7,), 5000, 64, s=2)
    x[:, 100:900] = 0
    x[3] = 0
    torch.testing.assert_close(gi.ops.sjlt(x, idx, sign, 64), sjlt_reference(x, idx, sign, 64))


@pytest.mark.parametrize("sign_dtype", [torch.int8, torch.int16, torch.int32, torch.int64,
                                        torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sjlt_accepts_every_sign_dtype(sign_dtype):
    x, idx, sign = make((3,), 50, 8, s=2, sign_dtype=sign_dtype)
    torch.testing.assert_close(gi.ops.sjlt(x, idx, sign, 8), x.double() @ dense_matrix(idx, sign, 8),
                               check_dtype=False)


def test_sjlt_noncontiguous_input_and_duplicates():
    x, idx, sign = make((6,), 40, 5)
    xt = torch.randn(40, 6).t()  # non-contiguous [6, 40]
    idx[:] = 2  # every coordinate lands in bucket 2
    out = gi.ops.sjlt(xt, idx, sign, 5)
    torch.testing.assert_close(out[:, 2], (xt * sign.float()).sum(-1))
    assert torch.count_nonzero(out[:, [0, 1, 3, 4]]) == 0


def test_sjlt_edge_shapes():
    x, idx, sign = make((0,), 10, 4)
    assert gi.ops.sjlt(x, idx, sign, 4).shape == (0, 4)
    x, idx, sign = make((3,), 10, 1)
    torch.testing.assert_close(gi.ops.sjlt(x, idx, sign, 1)[:, 0], (x * sign.float()).sum(-1))
    x1 = torch.randn(10)  # no batch dim
    assert gi.ops.sjlt(x1, idx, sign, 1).shape == (1,)
    z = torch.zeros(2, 0)
    e = torch.zeros(0, dtype=torch.long)
    assert torch.equal(gi.ops.sjlt(z, e, e.to(torch.int8), 3), torch.zeros(2, 3))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_sjlt_half_accuracy(device, dtype, tol):
    # Accumulation is float32, so the only error is the final rounding to the output dtype
    # (relative 2^-11 for float16, 2^-8 for bfloat16), however many coordinates are summed.
    x, idx, sign = make((8,), 4096, 32, s=2, dtype=dtype, device=device)
    out = gi.ops.sjlt(x, idx, sign, 32).cpu().double()
    want = x.cpu().double() @ dense_matrix(idx, sign, 32)
    assert ((out - want).abs() <= tol * want.abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mask_equals_index_select(device, dtype):
    x = torch.randn(2, 3, 50).to(dtype).to(device)
    idx = torch.tensor([4, 0, 49, 4, 7], device=device)
    assert torch.equal(gi.ops.mask(x, idx), x.index_select(-1, idx))
    assert gi.ops.mask(x[:, :0], idx).shape == (2, 0, 5)
    assert gi.ops.mask(x, idx[:0]).shape == (2, 3, 0)
    xt = torch.randn(50, 4, device=device).t()
    assert torch.equal(gi.ops.mask(xt, idx), xt[:, idx])


def test_adjoint_identity():
    # <S x, y> == <x, S^T y>, with S^T y the signed gather: this is what backward relies on.
    x, idx, sign = make((5,), 200, 16, s=3, dtype=torch.float64)
    y = torch.randn(5, 16, dtype=torch.float64)
    lhs = (gi.ops.sjlt(x, idx, sign, 16) * y).sum()
    rhs = (x * sjlt_adjoint(y, idx, sign)).sum()
    torch.testing.assert_close(lhs, rhs)


@given(
    batch=st.lists(st.integers(0, 3), min_size=0, max_size=2),
    d=st.integers(1, 70),
    k=st.integers(1, 9),
    s=st.sampled_from([None, 1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_sjlt_properties(batch, d, k, s, seed):
    x, idx, sign = make(tuple(batch), d, k, s=s, dtype=torch.float64, seed=seed)
    out = gi.ops.sjlt(x, idx, sign, k)
    assert out.shape == (*batch, k)
    torch.testing.assert_close(out, x @ dense_matrix(idx, sign, k))
    torch.testing.assert_close(out, sjlt_reference(x, idx, sign, k))
    y = torch.randn(*batch, k, dtype=torch.float64)
    torch.testing.assert_close((out * y).sum(), (x * sjlt_adjoint(y, idx, sign)).sum())
    m = torch.randint(0, d, (k,), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(gi.ops.mask(x, m), x[..., m])


# ---------------------------------------------------------------- gradients and opcheck

@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype, requires_grad):
    x, idx, sign = make((3,), 20, 6, s=2, dtype=dtype, device=device)
    x.requires_grad_(requires_grad)
    torch.library.opcheck(sjlt_op, (x, idx, sign, 6))
    torch.library.opcheck(sjlt_op, (x, idx[0], sign[0], 6))
    torch.library.opcheck(mask_op, (x, torch.tensor([3, 0, 19, 3], device=device)))


def test_gradcheck(device):
    x, idx, sign = make((2, 3), 12, 5, s=2, dtype=torch.float64, device=device)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: gi.ops.sjlt(t, idx, sign, 5), (x,))
    m = torch.tensor([1, 1, 11, 0], device=device)
    assert torch.autograd.gradcheck(lambda t: gi.ops.mask(t, m), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gi.ops.sjlt(gi.ops.mask(t, m), idx[:, :4], sign[:, :4], 5), (x,))


# ---------------------------------------------------------------- errors

def _raises(match):
    return pytest.raises((ValueError, RuntimeError), match=match)


def test_sjlt_errors():
    x, idx, sign = make((2,), 10, 4)
    with _raises(r"x has dtype torch.int32; expected float32.*x.float\(\)"):
        gi.ops.sjlt(x.int(), idx, sign, 4)
    with _raises(r"idx has dtype torch.int32; expected int64"):
        gi.ops.sjlt(x, idx.int(), sign, 4)
    with _raises(r"idx values must lie in \[0, k=3\), found range \[0, 3\]"):
        gi.ops.sjlt(x, idx, sign, 3)
    with _raises(r"idx values must lie in \[0, k=4\), found range \[-1, "):
        gi.ops.sjlt(x, torch.where(idx == idx[0], -1, idx), sign, 4)
    with _raises(r"x has 9 features but idx has 10 columns"):
        gi.ops.sjlt(x[:, :9], idx, sign, 4)
    with _raises(r"sign shape \(9,\) must equal idx shape \(10,\)"):
        gi.ops.sjlt(x, idx, sign[:9], 4)
    with _raises(r"sign entries must be \+1 or -1"):
        gi.ops.sjlt(x, idx, sign * 2, 4)
    with _raises(r"sign has dtype torch.bool"):
        gi.ops.sjlt(x, idx, sign > 0, 4)
    with _raises(r"idx must be \[d\] or \[s, d\], got shape \(1, 1, 10\)"):
        gi.ops.sjlt(x, idx[None, None], sign[None, None], 4)
    with _raises(r"k must be >= 1, got 0"):
        gi.ops.sjlt(x, idx, sign, 0)
    with _raises(r"at least one dimension"):
        gi.ops.sjlt(torch.tensor(1.0), idx, sign, 4)


def test_mask_errors():
    x = torch.randn(2, 10)
    with _raises(r"idx values must lie in \[0, d=10\), found range \[2, 10\]"):
        gi.ops.mask(x, torch.tensor([2, 10]))
    with _raises(r"idx must be 1-D"):
        gi.ops.mask(x, torch.tensor([[1]]))
    with _raises(r"idx has dtype torch.int32"):
        gi.ops.mask(x, torch.tensor([1], dtype=torch.int32))
    with _raises(r"x has dtype torch.int64"):
        gi.ops.mask(x.long(), torch.tensor([1]))


# ---------------------------------------------------------------- compile

def _pipeline(idx_in, idx_out, sign):
    def f(x):
        return gi.ops.sjlt(gi.ops.mask(x, idx_in) * 2.0, idx_out, sign, 8).relu()
    return f


def _compile_inputs():
    g = torch.Generator().manual_seed(0)
    idx_in = torch.randint(0, 40, (24,), generator=g)
    idx_out = torch.randint(0, 8, (2, 24), generator=g)
    sign = (torch.randint(0, 2, (2, 24), generator=g) * 2 - 1).to(torch.int8)
    return idx_in, idx_out, sign


def test_compile_no_graph_breaks_single_frame():
    f = _pipeline(*_compile_inputs())
    x = torch.randn(4, 40)
    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cf = torch.compile(f, backend=counter, fullgraph=True)
    for b in (3, 5, 9):
        xb = torch.randn(b, 40, requires_grad=True)
        torch._dynamo.mark_dynamic(xb, 0)
        out = cf(xb)
        torch.testing.assert_close(out, f(xb))
        (gc,) = torch.autograd.grad(out.sum(), xb)
        (ge,) = torch.autograd.grad(f(xb).sum(), xb)
        torch.testing.assert_close(gc, ge)
    assert counter.frame_count == 1


@pytest.mark.inductor
def test_inductor_compile():
    f = _pipeline(*_compile_inputs())
    torch._dynamo.reset()
    cf = torch.compile(f, backend="inductor", fullgraph=True)
    x = torch.randn(6, 40)
    torch.testing.assert_close(cf(x), f(x))


# ---------------------------------------------------------------- CUDA vs CPU

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_and_is_deterministic(dtype):
    x, idx, sign = make((33,), 3000, 64, s=2, dtype=dtype)
    x[:, 10:500] = 0
    cpu = sjlt_reference(x, idx, sign, 64)
    a = gi.ops.sjlt(x.cuda(), idx.cuda(), sign.cuda(), 64)
    b = gi.ops.sjlt(x.cuda(), idx.cuda(), sign.cuda(), 64)
    assert torch.equal(a, b)  # no atomics: bit-identical on the same device
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2)
    torch.testing.assert_close(a.cpu().double(), cpu.double(), atol=tol, rtol=tol)
    m = torch.randint(0, 3000, (100,))
    assert torch.equal(gi.ops.mask(x.cuda(), m.cuda()).cpu(), x[:, m])
    assert gi.native_status()["kernels"]["sjlt"]["CUDA"] in ("native", "fallback")


@pytest.mark.parametrize("layout", ["spans_every_row", "spans_per_row", "random"])
def test_sjlt_zero_block_paths_match_reference(layout):
    """The CPU kernel picks a block-skipping scatter for structured zeros and a plain one
    otherwise; both must equal the dense reference on the data that selects them."""
    g = torch.Generator().manual_seed(3)
    B, d, k = 9, 4096, 64
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    if layout == "spans_every_row":
        x = x * (torch.rand(d // 256, generator=g) > 0.6).repeat_interleave(256)
    elif layout == "spans_per_row":
        x = x * (torch.rand(B, d // 64, generator=g) > 0.9).repeat_interleave(64, 1)
    else:
        x = x * (torch.rand(B, d, generator=g) > 0.9)
    idx = torch.randint(0, k, (2, d), generator=g)
    sign = (torch.randint(0, 2, (2, d), generator=g) * 2 - 1).to(torch.int8)
    from grass_index.ops.reference import sjlt_reference
    torch.testing.assert_close(gi.ops.sjlt(x, idx, sign, k), sjlt_reference(x, idx, sign, k))
