"""What pass 2 does to each layer, priced: the form each layer's preconditioner takes (the
pipeline's own rule, ``precondition.uses_low_rank``), the bytes it keeps in RAM and on disk, the
peak RAM of each stage of pass 2, and the seconds of each stage at the machine's measured rates
(timing.Rates).

The forms (precondition/forms.py), with n examples and a layer of width k:
  * low-rank (eFIM, n < k): an n×n float64 core over the stored rows — fit 4n²k + (4/3)n³
    float64 (GGᵀ twice: the core and the eigenvalues for the damping's placement) + eigvalsh
    of n×n; applying it to all n rows 4n²k + 2n³ float64; the [n, K] rows stay in RAM;
  * dense (eFIM, n ≥ k): a k×k float32 inverse — pass 1 sums ĝĝᵀ (2nk² float32 GEMM into a
    float64 k×k), pass 2 caches F (8k² bytes written), factors it in place (potrf + potri, k³
    float64; ``auto`` damping adds an eigvalsh of k×k, the spectrum's placement a Lanczos
    top eigenvalue), writes the inverse (4k²) and applies it (2nk² float32);
  * EK-FAC (factored spec, identity projection): the eigenbases Q_G, Q_A and k corrected
    eigenvalues — one read of the store to fit them (a rotation, 2k(k_in + k_out) float64 per
    row) and two rotations per row to apply;
  * identity: nothing.
"""
from __future__ import annotations

import dataclasses

from ..precondition import parse_damping, uses_low_rank

CHUNK_BYTES = 256 << 20  # rows pass 2 reads back per chunk (indexdir/stored.py, fisher.py)
GEMM_ROWS = 4096
RECALL_QUERIES = 100  # pipeline/pass2.py: the recall queries scored exactly, twice


@dataclasses.dataclass(frozen=True)
class Layer:
    """One hooked layer as pass 2 treats it: width k, its form, and (EK-FAC) k_in, k_out."""
    name: str
    k: int
    form: str  # "none" | "low_rank" | "dense" | "ekfac"
    k_in: int = 0
    k_out: int = 0


def layer_forms(layout: dict[str, int], n: int, hessian: str = "eFIM",
                factors: dict[str, tuple[int, int]] | None = None) -> tuple[Layer, ...]:
    """Each layer's form, by the rule the pipeline uses (Preconditioner.fit_layers,
    pipeline.factors.fit_ekfac): identity none; EK-FAC where the layer has Kronecker factors
    (``factors``: {layer: (k_in, k_out)}); otherwise low-rank when 0 < n < k, else dense."""
    out = []
    for name, k in layout.items():
        k = int(k)
        if hessian == "identity":
            out.append(Layer(name, k, "none"))
        elif hessian == "ekfac" and factors and name in factors:
            ki, ko = (int(x) for x in factors[name])
            out.append(Layer(name, k, "ekfac", ki, ko))
        else:
            out.append(Layer(name, k, "low_rank" if uses_low_rank(n, k) else "dense"))
    return tuple(out)


def count(layers, form: str) -> int:
    return sum(1 for x in layers if x.form == form)


def form_bytes(layers, n: int) -> float:
    """The preconditioner's arrays (RAM when pass 2 applies it, and its bytes on disk)."""
    b = 0.0
    for x in layers:
        if x.form == "dense":
            b += 4.0 * x.k * x.k
        elif x.form == "low_rank":
            b += 8.0 * n * n
        elif x.form == "ekfac":
            b += 8.0 * (x.k_in ** 2 + x.k_out ** 2 + x.k)
    return b


def fisher_sum_bytes(layers) -> float:
    """The float64 k×k Fisher sums of the dense layers."""
    return sum(8.0 * x.k * x.k for x in layers if x.form == "dense")


def factor_bytes(factors) -> float:
    """The Kronecker factor sums pass 1 keeps (and saves) for a factored, identity spec."""
    return sum(8.0 * (ki * ki + ko * ko) for ki, ko in (factors or {}).values())


def chunk_rows(K: int) -> int:
    return max(1, min(2048, CHUNK_BYTES // (4 * max(K, 1))))


def pass2_ram(layers, n: int, K: int, index_bytes: float) -> dict[str, float]:
    """Peak bytes of each stage of pass 2 (above the process's base and the model):
    ``fit`` (the preconditioner being fitted) and ``fill`` (applying it to every row into
    FAISS); the pass's peak is the larger."""
    rows = 4.0 * n * K
    low = [x for x in layers if x.form == "low_rank"]
    dense = [x for x in layers if x.form == "dense"]
    c = min(chunk_rows(K), max(n, 1))
    kmax = max((x.k for x in layers), default=0)
    forms = form_bytes(layers, n)
    fit = 0.0
    if dense:  # every sum held, each factored in place; the float32 copies of the largest
        fit = fisher_sum_bytes(layers) + 12.0 * max(x.k for x in dense) ** 2
    if low:  # the [n, K] rows (read once: a concatenation), one layer's float64 copy
        fit = max(fit, 2.0 * rows + 8.0 * n * max(x.k for x in low) * 2 + form_bytes(low, n))
    if any(x.form == "ekfac" for x in layers):  # streamed: a chunk and its float64 rotations
        fit = max(fit, 4.0 * c * K + 3 * 8.0 * c * kmax)
    # fill: the forms (+ the rows the low-rank layers apply through), the index, a chunk read
    # back (its blocks and their concatenation), its preconditioned copy and the precision
    # guard's, and a layer's float64 temporaries
    work = 4 * 4.0 * c * K + 3 * 8.0 * c * kmax + 4.0 * min(RECALL_QUERIES, n) * K
    fill = forms + (rows if low else 0.0) + index_bytes + work
    return dict(fit=fit, fill=fill)


def pass2_times(layers, *, n: int, K: int, index_width: int, index_bytes: float,
                precond_disk: float, fisher_disk: float, rates, damping: str | None = "auto",
                in_store: bool = False) -> dict[str, float]:
    """Seconds of each stage of pass 2 at ``rates`` (timing.Rates): ``read`` (the store read
    back), ``fit``, ``apply``, ``index`` (FAISS fill, exact top lists, recall) and ``write``
    (the Fisher cache, the preconditioner and the index files, fsync'd). ``in_store``: the
    exact index is the store's rows (indexdir/scan.py): only the recall queries are
    preconditioned, and nothing is copied or written."""
    auto = parse_damping(damping)[0] == "auto"  # None: 0.3 × mean, an old record's
    reads = 1 + any(x.form == "low_rank" for x in layers) + any(x.form == "ekfac" for x in layers)
    t = dict(read=reads * 4.0 * n * K / rates.read)
    fit = apply = 0.0
    for x in layers:
        k = x.k
        if x.form == "dense":
            # Cholesky + inverse; the float32 symmetrised copy; 'auto' damping the spectrum
            # (which also places λ), else a Lanczos top eigenvalue (~60 products with F)
            fit += k ** 3 / rates.chol + 6 * 4.0 * k * k / rates.mem
            fit += k ** 3 / rates.eig if auto else 60 * 8.0 * k * k / rates.mem
            apply += 2.0 * n * k * k / rates.f32
        elif x.form == "low_rank":  # skinny [., k] × [k, n] products, tiny n×n solves
            rate = max(rates.skinny, min(rates.f64, rates.skinny * n / 64.0))
            small = rates.tiny + n ** 3 * (1.0 / rates.chol + 1.0 / rates.eig)  # latency-bound
            fit += 4.0 * n * n * k / rate + small
            apply += (4.0 * n * n * k + 2.0 * n ** 3) / rate
        elif x.form == "ekfac":
            rot = 2.0 * n * k * (x.k_in + x.k_out)
            fit += rot / rates.rotate + (x.k_in ** 3 + x.k_out ** 3) / rates.eig
            apply += 2 * rot / rates.rotate  # (the measured rate includes its conversions)
        if x.form == "low_rank":  # float64 copies in and out of each row block
            apply += 3 * 8.0 * n * k / rates.mem
    q = min(RECALL_QUERIES, n)
    if in_store:  # the recall queries are preconditioned, not the n rows
        apply *= q / max(n, 1)
        index_width = 0
    t["fit"], t["apply"] = fit, apply
    # FAISS add (a copy), the recall queries' exact lists during the fill and the built
    # index's search (2·q·n·K each), the precision guard's pass over every row
    t["index"] = 4.0 * n * index_width / rates.mem + 4.0 * n * K / rates.guard \
        + 2 * 2.0 * q * n * K / rates.f32
    t["write"] = (precond_disk + fisher_disk + n * index_width * index_bytes) / rates.disk \
        + commits(layers, fisher_disk > 0) * rates.sync
    return t


def commits(layers, cached_fisher: bool) -> int:
    """The fsync'd writes pass 2 makes: each array of each layer's form (a large one is a
    file and a header: two), the cached Fisher of a dense layer, the state, the index file,
    config.json and a few records."""
    per = {"dense": 2 + (2 if cached_fisher else 0), "low_rank": 1, "ekfac": 3, "none": 0}
    return sum(per[x.form] for x in layers) + 10
