"""How long a build takes, per phase: model FLOPs at this machine's measured rates (or one timed
batch of pass 1), so `grass-index plan` can price a model from its config alone."""
from __future__ import annotations

import dataclasses
import os

from ..capture import as_checkpoints
from ..capture.ensemble import single_model
from ..precondition import uses_low_rank

F64_FLOPS = 10e9  # float64 LAPACK/BLAS rate assumed when none is measured (2-core CPU)
F32_FLOPS = 40e9  # float32 GEMM rate assumed when none is measured
DISK_RATE = 300e6  # bytes/s written (with fsync), assumed
# Model FLOPs per second of pass 1, as a share of the GEMM rate (measured: GPT-2 small, T = 64,
# batch 32, 2 threads; benchmarks/lm.py — layer norms, softmax, the loss over the vocabulary
# and the sketch hooks run below the GEMM rate)
PASS1_EFFICIENCY = 0.55
CHECK_STEPS = 10.0  # the capture check costs about this many examples' training steps
CHECK_FIXED_S = 1.0  # ... plus the model fingerprint and the sketcher's set-up


@dataclasses.dataclass(frozen=True)
class Rates:
    """The machine's rates a time prediction uses, and where they come from."""
    f32: float = F32_FLOPS
    f64: float = F64_FLOPS
    disk: float = DISK_RATE
    basis: str = "assumed rates"


def measure_rates(size: int = 512, seconds: float = 0.4, out=None) -> Rates:
    """float32/float64 GEMM rates of this machine now — the mean over ``seconds`` of repeated
    products, so on a shared machine it is the share this process gets, not a quiet burst —
    and, with ``out``, the rate of a 32 MB write + fsync there: the time prediction's basis
    when no batch can be timed (a model on the meta device)."""
    import time

    import torch

    def rate(dtype):
        a = torch.randn(size, size, dtype=dtype)
        a @ a  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            a @ a
            done += 1
        return 2.0 * size ** 3 * done / (time.perf_counter() - t0)
    return Rates(f32=rate(torch.float32), f64=rate(torch.float64),
                 disk=DISK_RATE if out is None else disk_rate(out),
                 basis=f"model FLOPs at this machine's measured GEMM rate × {PASS1_EFFICIENCY}")


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


def pass2_seconds(layout: dict[str, int], n: int, hessian: str = "eFIM",
                  rates: Rates | None = None, plan=None) -> float:
    """Pass 2: factoring each layer (k³ dense; 2nk² for the Woodbury form and k² per row to
    form its dense k×k inverse; EK-FAC's dense Q·diag·Qᵀ, 2k³), preconditioning every row
    (2k² per row), and writing the Fisher/preconditioner/index files (``plan``'s bytes)."""
    r = rates or Rates()
    ks = [int(k) for k in layout.values()]
    if hessian not in ("eFIM", "ekfac"):
        fit = 0.0
        apply = 0.0
    else:
        fit = sum((k ** 3 / 3.0 + 2.0 * k ** 3 if not uses_low_rank(n, k)
                   else 2.0 * n * k * k + 2.0 * n * k * k) for k in ks) / r.f64
        if hessian == "ekfac":
            fit += sum(2.0 * k ** 3 for k in ks) / r.f32
        apply = 2.0 * n * sum(k * k for k in ks) / r.f32
    files = (plan.fisher_disk + plan.precond_disk + plan.index_disk) if plan is not None else \
        sum(12.0 * k * k for k in ks if not uses_low_rank(n, k))
    return fit + apply + files / r.disk


def predict_seconds(model, layout: dict[str, int], *, n: int, tokens: int, batch_size: int,
                    hessian: str = "eFIM", rates: Rates | None = None,
                    batch_seconds: float | None = None, plan=None) -> dict:
    """{check, pass1, pass2, basis}: a build's time per phase. Pass 1 from ``batch_seconds``
    (one timed batch of pass 1, when a batch could be timed) or from the model's FLOPs at the
    machine's GEMM rate (``rates``; measured now when not given)."""
    import math

    r = rates or measure_rates()
    batches = math.ceil(n / batch_size)
    per_example = epoch_flops(model, tokens) / (r.f32 * PASS1_EFFICIENCY)
    if batch_seconds is not None:
        pass1, basis = batches * batch_seconds, "one timed batch of pass 1"
    else:
        pass1 = n * pass1_flops(model, tokens) / (r.f32 * PASS1_EFFICIENCY)
        basis = r.basis
    # the store's rows written with fsync: 4·K bytes per example
    pass1 += 4.0 * n * sum(layout.values()) / r.disk
    return dict(check=CHECK_FIXED_S + CHECK_STEPS * per_example,
                pass1=pass1, pass2=pass2_seconds(layout, n, hessian, r, plan), basis=basis)


