"""Damping syntax: relative λ (× mean eigenvalue of F_l, scale-free across layers) by default,
or an absolute λ with the prefix "abs:"."""
from __future__ import annotations


import math

from .errors import PreconditionError

# Relative damping used when none is given (λ_l = DEFAULT_DAMPING × mean eigenvalue of F_l).
# Chosen by LDS on digits (30 half-subsets, 360 queries): 0.3 was best or within 0.004 of best
# for sjlt-1024 and sjlt-4096; 0.1 lost 0.05 LDS on the default config (see README).
DEFAULT_DAMPING = 0.3

_SYNTAX = ("damping is a relative factor (λ = factor × mean eigenvalue of F per layer), e.g. "
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
    lo, hi = RELATIVE_RANGE if mode == "relative" else ABSOLUTE_RANGE
    if not math.isfinite(value):
        why = "it must be a finite number"
    elif value < lo:
        why = (f"it must be at least {lo:g}: 0, negative or tinier damping leaves F + λI "
               "singular (or nearly) when a layer has fewer examples than sketch dimensions")
    elif value > hi:
        why = (f"it must be at most {hi:g}: beyond that (F + λI)^-1 ≈ I/λ, the ranking is "
               "--hessian identity's and scores underflow float32 to 0")
    else:
        return value
    kind = "a relative factor" if mode == "relative" else "an absolute λ"
    raise PreconditionError(f"bad damping {original!r} ({kind}): {why}. Accepted: relative "
                     f"{RELATIVE_RANGE[0]:g}..{RELATIVE_RANGE[1]:g} (default "
                     f"{DEFAULT_DAMPING}), absolute abs:{ABSOLUTE_RANGE[0]:g}.."
                     f"abs:{ABSOLUTE_RANGE[1]:g}, e.g. 0.1 or abs:1e-3")


def parse_damping(x) -> tuple[str, float]:
    """None -> ("relative", DEFAULT_DAMPING); 0.1 / "0.1" / "rel:0.1" -> relative; "abs:1e-3" ->
    ("absolute", 1e-3). Anything else -> ValueError showing the syntax."""
    if x is None:
        return "relative", float(DEFAULT_DAMPING)
    if isinstance(x, bool):
        raise PreconditionError(f"bad damping {x!r}: {_SYNTAX}")
    if isinstance(x, (int, float)):
        return "relative", _number(x, x, "relative")
    if isinstance(x, str):
        text = x.strip().lower()
        for prefix, mode in (("abs:", "absolute"), ("rel:", "relative")):
            if text.startswith(prefix):
                return mode, _number(text[len(prefix):], x, mode)
        return "relative", _number(text, x, "relative")
    raise PreconditionError(f"bad damping {x!r} of type {type(x).__name__}: {_SYNTAX}")


def format_damping(mode: str, value: float) -> str:
    """Inverse of parse_damping, for recording the setting in an index directory."""
    return f"abs:{value!r}" if mode == "absolute" else repr(float(value))
