"""Damping syntax: "auto" (the default: λ_l from the spectrum of F_l, see :func:`auto_damping`
and docs/damping.md), a relative λ (a number: × mean eigenvalue of F_l, scale-free across
layers), or an absolute λ with the prefix "abs:". ``None`` is what an index built before "auto"
became the default records, and keeps its meaning: 0.3 × mean eigenvalue (LEGACY_DAMPING).
Also where a damping sits in a layer's spectrum (:func:`placement`, shown by `grass-index
info`)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import option
from .errors import PreconditionError

# The damping of every entry point when none is given (build, merge of workers, torchrun, the
# mask fit, EK-FAC): within 0.03 LDS of the best damping on every task measured, where 0.3 ×
# mean missed by up to 0.09 (benchmarks/damping.py, docs/damping.md). A new index records it
# as the string "auto".
DEFAULT_DAMPING = "auto"
# What ``damping=None`` means, and what every index built before "auto" records (null): the
# relative damping that was the default, λ_l = 0.3 × mean eigenvalue of F_l. An old index keeps
# scoring exactly as it did (verify --repair, a resumed pass 2, a refit keeping its damping).
LEGACY_DAMPING = 0.3

# "auto": λ_l = AUTO_MULTIPLE × the eigenvalue of F_l at which the spectrum, sorted from the
# top, has accumulated AUTO_TAIL of its trace (the floor under which the directions hold 0.05%
# of the Fisher). Constants chosen on five tasks, each within 0.03 LDS of the best damping when
# fitted on the other four (benchmarks/damping.py, docs/damping.md).
AUTO_TAIL = 0.9995
AUTO_MULTIPLE = 30.0

_SYNTAX = ("damping is 'auto' (the default: λ from each layer's spectrum; 'auto:30' sets its "
           "multiple), a relative factor (λ = factor × mean eigenvalue of F per layer), e.g. "
           "0.1 or '0.1', or an absolute λ written 'abs:1e-3'")

# Accepted ranges, and why. Below the lower end F + λI is (numerically) singular whenever a
# layer has fewer examples than sketch dimensions, and the inverse amplifies noise; above the
# upper end (F + λI)^-1 ≈ I/λ: the ranking is identity preconditioning (say --hessian
# identity) and the preconditioned vectors shrink towards float32 underflow (scores of 0.0
# and an arbitrary top-k).
RELATIVE_RANGE = (1e-8, 1e6)
ABSOLUTE_RANGE = (1e-30, 1e30)


def _number(text, original, mode: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PreconditionError(f"bad damping {original!r}: {_SYNTAX}") from None
    lo, hi = ABSOLUTE_RANGE if mode == "absolute" else RELATIVE_RANGE
    if not math.isfinite(value):
        why = "it must be a finite number"
    elif value < lo:
        why = (f"it must be at least {lo:g}: 0, negative or tinier damping leaves F + λI "
               "singular (or nearly) when a layer has fewer examples than sketch dimensions")
    elif value > hi:
        why = (f"it must be at most {hi:g}: beyond that (F + λI)^-1 ≈ I/λ, the ranking is "
               f"that of {option('hessian', 'identity')} and scores underflow float32 to 0")
    else:
        return value
    kind = {"relative": "a relative factor", "absolute": "an absolute λ",
            "auto": "auto's multiple of the spectrum's floor"}[mode]
    raise PreconditionError(f"bad damping {original!r} ({kind}): {why}. Accepted: relative "
                     f"{RELATIVE_RANGE[0]:g}..{RELATIVE_RANGE[1]:g}, absolute "
                     f"abs:{ABSOLUTE_RANGE[0]:g}..abs:{ABSOLUTE_RANGE[1]:g}, or auto[:M] "
                     f"(the default), e.g. 0.1, abs:1e-3 or auto")


def parse_damping(x) -> tuple[str, float]:
    """None -> ("relative", LEGACY_DAMPING): what an index built before "auto" records (not the
    default: entry points default to DEFAULT_DAMPING, "auto"); 0.1 / "0.1" / "rel:0.1" ->
    relative; "abs:1e-3" -> ("absolute", 1e-3); "auto" / "auto:30" -> ("auto", multiple).
    Anything else -> PreconditionError showing the syntax."""
    if x is None:
        return "relative", float(LEGACY_DAMPING)
    if isinstance(x, bool):
        raise PreconditionError(f"bad damping {x!r}: {_SYNTAX}")
    if isinstance(x, (int, float)):
        return "relative", _number(x, x, "relative")
    if isinstance(x, str):
        text = x.strip().lower()
        if text == "auto":
            return "auto", AUTO_MULTIPLE
        for prefix, mode in (("abs:", "absolute"), ("rel:", "relative"), ("auto:", "auto")):
            if text.startswith(prefix):
                return mode, _number(text[len(prefix):], x, mode)
        return "relative", _number(text, x, "relative")
    raise PreconditionError(f"bad damping {x!r} of type {type(x).__name__}: {_SYNTAX}")


def format_damping(mode: str, value: float) -> str:
    """Inverse of parse_damping, for recording the setting in an index directory."""
    if mode == "auto":
        return "auto" if value == AUTO_MULTIPLE else f"auto:{float(value)!r}"
    return f"abs:{value!r}" if mode == "absolute" else repr(float(value))


def layer_damping(mode: str, value: float, trace: float, size: float,
                  eigenvalues=None) -> float:
    """λ of one layer: factor × its mean eigenvalue (trace / size, evaluated as value × trace
    / size as it always was: the same bits), the absolute λ, or (auto) the rule on its
    spectrum — ``eigenvalues`` (an array, or a callable computing it only when needed)."""
    if mode == "relative":
        return value * trace / size
    if mode == "absolute":
        return value
    if eigenvalues is None:
        raise PreconditionError("damping 'auto' needs the layer's eigenvalues")
    return auto_damping(eigenvalues() if callable(eigenvalues) else eigenvalues, value)


def _spectrum(eigenvalues) -> np.ndarray:
    """Eigenvalues as float64, largest first, rounding negatives (of a PSD matrix) to 0."""
    e = np.clip(np.asarray(eigenvalues, dtype=np.float64).reshape(-1), 0, None)
    return np.sort(e)[::-1]


def auto_damping(eigenvalues, multiple: float = AUTO_MULTIPLE) -> float:
    """λ = multiple × σ_floor, σ_floor the eigenvalue at which the spectrum (from the top) has
    accumulated AUTO_TAIL of the trace. Directions below the floor hold almost none of the
    Fisher: an undamped inverse would rank by them (sketch and sampling noise); damping a
    multiple above it resolves the directions that carry the signal and nothing else. A Fisher
    dominated by a few directions has a high floor relative to its mean eigenvalue, so the rule
    moves towards identity there (docs/damping.md). 0.0 for a zero spectrum."""
    e = _spectrum(eigenvalues)
    total = float(e.sum())
    if not total > 0:
        return 0.0
    j = int(np.searchsorted(np.cumsum(e) / total, AUTO_TAIL))
    return float(multiple) * float(e[min(j, e.size - 1)])


def effective_dimension(eigenvalues, lam: float) -> float:
    """d_eff(λ) = Σ σ_i / (σ_i + λ): how many directions (F + λI)^-1 still resolves (k as
    λ → 0 for a full-rank F, 0 as λ → ∞: identity)."""
    e = _spectrum(eigenvalues)
    if lam <= 0:
        return float((e > 0).sum())
    return float((e / (e + lam)).sum())


# Eigenvalues below this × the top one are rounding noise (of float64 eigvalsh, and of a Fisher
# summed from float32 rows): a layer with fewer examples than dimensions has them in place of
# its exact zeros (seen up to 2e-10 × top on tiny_gpt's layers).
NUMERICAL_ZERO = 1e-9


def placement(eigenvalues, lam: float) -> dict:
    """Where λ sits in a layer's spectrum (what `info` shows): d_eff/k near 1 is almost no
    damping, near 0 almost identity; λ against the top and median eigenvalues."""
    e = _spectrum(eigenvalues)
    if not e.size or not e[0] > 0:
        return {"d_eff/k": None, "lambda/top": None, "lambda/median": None}
    e[e < e[0] * NUMERICAL_ZERO] = 0.0  # rounding noise of a rank-deficient F, not a direction
    median = float(np.median(e))
    return {"d_eff/k": _sig(effective_dimension(e, lam) / e.size),
            "lambda/top": _sig(lam / float(e[0])),
            "lambda/median": _sig(lam / median) if median > 0 else None}


def placement_without_spectrum(k: int, lam: float, inverse_trace: float, top: float) -> dict:
    """The same from what a Cholesky fit has at hand: d_eff = k − λ·tr((F + λI)^-1) exactly,
    the top eigenvalue (Lanczos); the median would need every eigenvalue, so it is None."""
    return {"d_eff/k": _sig(max(0.0, k - lam * inverse_trace) / k),
            "lambda/top": _sig(lam / top) if top > 0 else None, "lambda/median": None}


def _sig(x: float) -> float:
    return float(f"{x:.3g}")
