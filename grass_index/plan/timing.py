"""How long a build takes, per phase: model FLOPs at this machine's measured rates (or one timed
batch of pass 1), so `grass-index plan` can price a model from its config alone."""
from __future__ import annotations

import dataclasses
import os

from ..capture import as_checkpoints
from ..capture.ensemble import single_model
from . import costs

F64_FLOPS = 10e9  # float64 GEMM rate assumed when none is measured (2-core CPU)
F32_FLOPS = 40e9  # float32 GEMM rate assumed when none is measured
DISK_RATE = 300e6  # bytes/s written (with fsync), assumed
CHOL_RATE = 5e9  # k³/s of a float64 Cholesky + inverse (potrf + potri), assumed
EIG_RATE = 1.5e9  # k³/s of a float64 eigvalsh, assumed
READ_RATE = 1e9  # bytes/s of stored rows read back and CRC-checked, assumed
MEM_RATE = 2e9  # bytes/s of a large array copy, assumed
SYNC_S = 0.005  # seconds of one small write + fsync (an LMDB commit, a small file), assumed
SKINNY_FLOPS = 3e9  # float64 FLOP/s of the low-rank form's [64, k] × [k, 64] products, assumed
GUARD_RATE = 500e6  # bytes/s of the precision guard over preconditioned rows, assumed
ROTATE_FLOPS = 3e9  # float64 FLOP/s of EK-FAC's rotations (Q_Gᵀ M Q_A per row), assumed
TINY_S = 0.002  # seconds of a 64×64 Cholesky solve + eigvalsh (per low-rank layer), assumed
LAPACK_SIZE = 768  # the order the LAPACK rates are measured at
# Model FLOPs per second of pass 1, as a share of the GEMM rate (measured: GPT-2 small, T = 64,
# batch 8, 2 threads, load 1.5; benchmarks/lm.py --n 64, two runs: pass 1 15.0 and 15.1 s, the
# plan 15.1 and 15.2 — layer norms, softmax, the loss over the vocabulary and the sketch hooks
# run below the GEMM rate; it was 0.55, calibrated before pass 1's per-token sketching got
# cheaper, and priced pass 1 34% high)
PASS1_EFFICIENCY = 0.74
# the capture check costs about this many examples' training steps: a hooked forward + backward
# on 4 examples and one exact single-example reference (same runs: 2.7-2.8 s measured, 2.7 s
# planned; it was 10 with two references)
CHECK_STEPS = 5.0
CHECK_FIXED_S = 1.0  # ... plus the model fingerprint and the sketcher's set-up


@dataclasses.dataclass(frozen=True)
class Rates:
    """The machine's rates a time prediction uses, and where they come from: GEMM FLOP/s
    (float32, float64), LAPACK k³/s (Cholesky + inverse, eigvalsh), bytes/s (write + fsync,
    read back + CRC, copy)."""
    f32: float = F32_FLOPS
    f64: float = F64_FLOPS
    disk: float = DISK_RATE
    basis: str = "assumed rates"
    chol: float = CHOL_RATE
    eig: float = EIG_RATE
    read: float = READ_RATE
    mem: float = MEM_RATE
    sync: float = SYNC_S
    skinny: float = SKINNY_FLOPS
    guard: float = GUARD_RATE
    tiny: float = TINY_S
    rotate: float = ROTATE_FLOPS


def _mean_rate(fn, work: float, seconds: float, warm: bool = True) -> float:
    """work × calls / seconds of ``fn`` called repeatedly for about ``seconds`` (after one
    warm-up call): on a shared machine, the share this process gets, not a quiet burst."""
    import time

    if warm:
        fn()
    done, t0 = 0, time.perf_counter()
    while True:
        fn()
        done += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return work * done / dt


def measure_rates(size: int = 512, seconds: float = 0.4, out=None,
                  lapack_size: int = LAPACK_SIZE) -> Rates:
    """This machine's rates now, each the mean over a share of ``seconds`` of repeated calls:
    float32/float64 GEMM FLOP/s, LAPACK's float64 Cholesky + inverse (k³/s at order
    ``lapack_size``: the rate grows with the order, so a plan with dense k×k layers measures
    near its k — at most 4096 — see ``lapack_order``) and the spectrum damping 'auto' takes
    (k³/s at the same order), pass 2's own small kernels (``_form_rates``),
    reading rows back (CRC32 + copy) and copying, and, with ``out``, a 32 MB write + fsync and
    a 4 KB one there: the time prediction's basis when no batch can be timed (a model on the
    meta device)."""
    import zlib

    import numpy as np
    import torch
    from scipy.linalg import lapack

    def gemm(dtype):
        a = torch.randn(size, size, dtype=dtype)
        return _mean_rate(lambda: a @ a, 2.0 * size ** 3, seconds / 4)
    f32, f64 = gemm(torch.float32), gemm(torch.float64)
    k = int(lapack_size)
    x = np.random.default_rng(0).standard_normal((k, k))
    spd = x + x.T + k * np.eye(k)  # positive definite (its eigenvalues stay near k)

    def chol():
        c, _ = lapack.dpotrf(spd.T, lower=True, overwrite_a=False, clean=False)
        lapack.dpotri(c, lower=True, overwrite_c=True)
    # both k³ rates keep growing with the order (quiet, 2 threads: eigvalsh 8.5e9 at 1024,
    # 2.1e10 at 2048, 3.2e10 at 4096; Cholesky + inverse 6.2e10, 7.9e10, 9.2e10), so both are
    # measured at the plan's own order: a rate at 1024 priced GPT-2 small's 4096² spectra 4x high
    lap = dict(chol=_mean_rate(chol, float(k) ** 3, seconds / 4, warm=False),
               eig=_mean_rate(lambda: _spectrum()(spd), float(k) ** 3, seconds / 4,
                              warm=False))
    buf = np.ones(8 << 20, np.float32)  # 32 MB
    dst = np.empty_like(buf)
    mem = _mean_rate(lambda: np.copyto(dst, buf), float(buf.nbytes), seconds / 16)
    crc = _mean_rate(lambda: zlib.crc32(buf), float(buf.nbytes), seconds / 16)
    return Rates(f32=f32, f64=f64, disk=DISK_RATE if out is None else disk_rate(out),
                 basis=f"model FLOPs at this machine's measured GEMM rate × {PASS1_EFFICIENCY}",
                 read=1.0 / (1.0 / crc + 2.0 / mem), mem=mem,
                 sync=SYNC_S if out is None else sync_seconds(out), **lap,
                 **_form_rates(seconds / 8))


def _form_rates(seconds: float) -> dict:
    """The rates of pass 2's own small kernels, which run far below the GEMM rate (thread
    wake-ups, skinny shapes, numpy reductions), measured on the code itself: the low-rank
    form's products ([64, 2048] rows against 64 stored rows), a 64×64 core's Cholesky solve +
    eigvalsh, the precision guard over preconditioned float32 rows (8 MB), and EK-FAC's
    rotations of 64×64 sketches."""
    import numpy as np
    import scipy.linalg

    from ..precondition.fisher import layer_slices
    from ..precondition.forms import Ekfac
    from ..precondition.preconditioner import guard_precision

    rng = np.random.default_rng(0)
    n, k = 64, 2048
    G = rng.standard_normal((n, k))
    a = rng.standard_normal((n, k))
    core = np.eye(n)
    skinny = _mean_rate(lambda: ((a @ G.T) @ core) @ G, 4.0 * n * n * k + 2.0 * n ** 3,
                        seconds)
    M = G[:, :n].T @ G[:, :n] + n * np.eye(n)

    def tiny():
        scipy.linalg.cho_solve(scipy.linalg.cho_factor(M, lower=True), np.eye(n))
        scipy.linalg.eigvalsh(M, check_finite=False)
    raw = rng.standard_normal((32, 16 * 4096)).astype(np.float32)
    slices = layer_slices({str(i): 4096 for i in range(16)})
    guard = _mean_rate(lambda: guard_precision(raw, raw.copy(), slices), float(raw.nbytes),
                       seconds)
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ek = Ekfac(q, q, np.ones(n * n), 0.1)
    rows = raw[:, :n * n]
    rotate = _mean_rate(lambda: ek.apply(rows, None), 2 * 2.0 * len(rows) * n ** 3, seconds)
    return dict(skinny=skinny, tiny=1.0 / _mean_rate(tiny, 1.0, seconds), guard=guard,
                rotate=rotate)


def _spectrum():
    """The function pass 2 takes a dense layer's spectrum with (damping 'auto')."""
    from ..precondition.eigen import eigenvalues

    return eigenvalues


def lapack_order(plans) -> int:
    """The order to measure LAPACK's rates at for these plans: their largest dense layer's k
    (at most 4096: one Cholesky + inverse and one eigvalsh of 4096², ~3 s quiet, for a build
    whose pass 2 takes minutes), else ``LAPACK_SIZE``."""
    ks = [x.k for p in plans for x in p.layers if x.form == "dense"]
    return min(max(ks), 4096) if ks and max(ks) > LAPACK_SIZE else LAPACK_SIZE


def _folder(out) -> str:
    p = os.path.abspath(os.fspath(out))
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    return p


def sync_seconds(out, times: int = 3) -> float:
    """Seconds of one 4 KB write + fsync next to ``out`` (the mean of ``times``): what each
    commit of a small array costs beyond its bytes."""
    import tempfile
    import time

    try:
        with tempfile.NamedTemporaryFile(dir=_folder(out)) as f:
            t0 = time.perf_counter()
            for _ in range(times):
                f.write(b"x" * 4096)
                f.flush()
                os.fsync(f.fileno())
            return (time.perf_counter() - t0) / times
    except OSError:
        return SYNC_S


def disk_rate(out, size: int = 32 << 20) -> float:
    """Bytes/s of one write + fsync of ``size`` bytes next to ``out`` (its nearest existing
    folder; the file is removed)."""
    import tempfile
    import time

    p = os.path.abspath(os.fspath(out))
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    buf = os.urandom(1 << 20) * (size >> 20)
    try:
        with tempfile.NamedTemporaryFile(dir=p) as f:
            t0 = time.perf_counter()
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
            return size / max(time.perf_counter() - t0, 1e-6)
    except OSError:
        return DISK_RATE


def on_meta_device(model) -> bool:
    """Whether a model (or any checkpoint of an ensemble) is on the meta device: shapes only,
    as `grass-index plan --hf-model` builds it from a config alone."""
    models = as_checkpoints(model) or [single_model(model)]
    return any(p.is_meta for m in models for p in m.parameters())


def matmul_params(model) -> tuple[int, int, int]:
    """(weights that multiply activations: Linear/Conv1D and a tied LM head, layers L, width d)
    of a model — summed over the checkpoints of an ensemble — (works on the meta device: only
    shapes are read)."""
    import torch

    models = as_checkpoints(model) or [single_model(model)]
    model = models[0]
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            n += int(w.numel()) * len(models)  # an ensemble sketches every checkpoint
    cfg = getattr(model, "config", None)
    L = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0)
    d = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
    return n, L, d


def pass1_flops(model, tokens: int) -> float:
    """FLOPs of pass 1 per example: forward (2 per weight per token) + backward to the
    activations only (2 more; pass 1 never forms weight gradients), plus attention's T×T
    products (forward 4·L·T·d per token, backward twice that) for a transformer config."""
    N, L, d = matmul_params(model)
    return tokens * (4.0 * N + 12.0 * L * tokens * d)


def epoch_flops(model, tokens: int) -> float:
    """FLOPs of one training example: forward + backward with weight gradients."""
    N, L, d = matmul_params(model)
    return tokens * (6.0 * N + 12.0 * L * tokens * d)


def pass2_stages(layout: dict[str, int], n: int, hessian: str = "eFIM",
                 rates: Rates | None = None, plan=None, damping=None) -> dict[str, float]:
    """Seconds of each stage of pass 2 (costs.pass2_times: read, fit, apply, index, write),
    for the forms each layer takes (``plan``'s, else the pipeline's rule on ``layout``)."""
    r = rates or Rates()
    K = sum(int(k) for k in layout.values())
    if plan is not None and plan.layers:
        layers, width, ib = plan.layers, plan.index_width, plan.index_bytes
        pdisk, fdisk, in_store = plan.precond_disk, plan.fisher_disk, plan.index_in_store
        damping = plan.damping if damping is None else damping
    else:
        layers = costs.layer_forms(layout, n, hessian)
        width, ib, in_store = K, 4, True  # the default: exact, scanned from the store
        pdisk, fdisk = costs.form_bytes(layers, n), costs.fisher_sum_bytes(layers)
        damping = "auto" if damping is None else damping  # the build's default
    return costs.pass2_times(layers, n=n, K=K, index_width=width, index_bytes=ib,
                             precond_disk=pdisk, fisher_disk=fdisk, rates=r, damping=damping,
                             in_store=in_store)


def pass2_seconds(layout: dict[str, int], n: int, hessian: str = "eFIM",
                  rates: Rates | None = None, plan=None, damping=None) -> float:
    """Pass 2's seconds: the sum of ``pass2_stages``."""
    return sum(pass2_stages(layout, n, hessian, rates, plan, damping).values())


def pass1_extra_seconds(layers, n: int, tokens: int, K: int, rates: Rates) -> float:
    """What pass 1 adds to the model's own work: the store's rows written with fsync (4·K
    bytes per example), the dense layers' Fisher sums (a 2·k² float32 GEMM per row) and the
    Kronecker factors of a factored, identity spec (2·(k_in² + k_out²) float64 per token)."""
    fisher = sum(2.0 * n * x.k * x.k for x in layers if x.form == "dense") / rates.f32
    factors = sum(2.0 * n * tokens * (x.k_in ** 2 + x.k_out ** 2)
                  for x in layers if x.k_in) / rates.f64
    return 4.0 * n * K / rates.disk + fisher + factors


def predict_seconds(model, layout: dict[str, int], *, n: int, tokens: int, batch_size: int,
                    hessian: str = "eFIM", rates: Rates | None = None,
                    batch_seconds: float | None = None, plan=None, damping=None) -> dict:
    """{check, pass1, pass2, pass2_stages, basis}: a build's time per phase. Pass 1 from
    ``batch_seconds`` (one timed batch of pass 1, when a batch could be timed) or from the
    model's FLOPs at the machine's GEMM rate (``rates``; measured now when not given), plus
    what pass 1 adds per row (``pass1_extra_seconds``); pass 2 per stage (``pass2_stages``)."""
    import math

    r = rates or measure_rates()
    batches = math.ceil(n / batch_size)
    per_example = epoch_flops(model, tokens) / (r.f32 * PASS1_EFFICIENCY)
    if batch_seconds is not None:
        pass1, basis = batches * batch_seconds, "one timed batch of pass 1"
    else:
        pass1 = n * pass1_flops(model, tokens) / (r.f32 * PASS1_EFFICIENCY)
        basis = r.basis
    layers = plan.layers if plan is not None and plan.layers else \
        costs.layer_forms(layout, n, hessian)
    pass1 += pass1_extra_seconds(layers, n, tokens, sum(layout.values()), r)
    stages = pass2_stages(layout, n, hessian, r, plan, damping)
    return dict(check=CHECK_FIXED_S + CHECK_STEPS * per_example, pass1=pass1,
                pass2=sum(stages.values()), pass2_stages=stages, basis=basis)
