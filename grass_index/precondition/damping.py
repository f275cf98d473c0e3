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
           "0.1 or '0.1', or an absolute λ written 'abs:1e-3'; it must be a finite number >= 0")


def _number(text, original) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PreconditionError(f"bad damping {original!r}: {_SYNTAX}") from None
    if not math.isfinite(value) or value < 0:
        raise PreconditionError(f"bad damping {original!r}: {_SYNTAX}")
    return value


def parse_damping(x) -> tuple[str, float]:
    """None -> ("relative", DEFAULT_DAMPING); 0.1 / "0.1" / "rel:0.1" -> relative; "abs:1e-3" ->
    ("absolute", 1e-3). Anything else -> ValueError showing the syntax."""
    if x is None:
        return "relative", float(DEFAULT_DAMPING)
    if isinstance(x, bool):
        raise PreconditionError(f"bad damping {x!r}: {_SYNTAX}")
    if isinstance(x, (int, float)):
        return "relative", _number(x, x)
    if isinstance(x, str):
        text = x.strip().lower()
        for prefix, mode in (("abs:", "absolute"), ("rel:", "relative")):
            if text.startswith(prefix):
                return mode, _number(text[len(prefix):], x)
        return "relative", _number(text, x)
    raise PreconditionError(f"bad damping {x!r} of type {type(x).__name__}: {_SYNTAX}")


def format_damping(mode: str, value: float) -> str:
    """Inverse of parse_damping, for recording the setting in an index directory."""
    return f"abs:{value!r}" if mode == "absolute" else repr(float(value))
