"""The compression spec language: ``TYPE``, ``TYPE-DIM`` or ``TYPE-DIMin*DIMout``, plus options.

Grammar (case-insensitive kind, no spaces)::

    spec    := kind [ "-" dims ] [ ":" option { "," option } ]
    dims    := INT | INT "*" INT          # A*B = (dim for d_in / x side) * (dim for d_out / grad side)
    option  := "s=" INT                   # sjlt, grass: non-zeros per input coordinate (default 1)
             | "mask=" INT                # grass: the intermediate mask size k' (default min(d, 4k))

Examples: ``identity``, ``sjlt-4096``, ``sjlt-4096:s=4``, ``random_mask-128*128``,
``normal-64*64``, ``grass-4096``, ``grass-4096:mask=16384,s=2``.

``str(parse_spec(s))`` gives back the canonical form (default options left out), so an index
directory can record the spec it was built with and re-parse it.
"""
from __future__ import annotations


import re
from dataclasses import dataclass

from .errors import CompressError

KINDS = ("identity", "normal", "rademacher", "sjlt", "fjlt", "random_mask", "selective_mask", "grass")
# kinds that may be factored (A*B): each factor gets its own transform of that kind.
FACTORABLE = ("identity", "normal", "rademacher", "sjlt", "fjlt", "random_mask", "selective_mask")
# default k'/k ratio of the grass kind: the mask keeps 4x the output dim so the (cheap, O(k'))
# mask discards less of the gradient, and the SJLT (also O(k')) does the rest of the reduction.
GRASS_MASK_RATIO = 4

_OPTIONS = {"sjlt": ("s",), "grass": ("s", "mask")}
_SPEC_RE = re.compile(r"^([a-z_]+)(?:-([0-9]+)(?:\*([0-9]+))?)?(?::(.*))?$")


@dataclass(frozen=True)
class Spec:
    """One parsed spec. ``dims`` is () for plain ``identity``, (k,) flat, (k_in, k_out) factored."""

    kind: str
    dims: tuple[int, ...] = ()
    s: int = 1
    mask: int | None = None  # grass only: intermediate mask size k'

    @property
    def factored(self) -> bool:
        return len(self.dims) == 2

    def __str__(self) -> str:
        out = self.kind
        if self.dims:
            out += "-" + "*".join(str(d) for d in self.dims)
        opts = []
        if self.s != 1:
            opts.append(f"s={self.s}")
        if self.mask is not None:
            opts.append(f"mask={self.mask}")
        return out + (":" + ",".join(opts) if opts else "")


def _fail(text: str, why: str, fix: str):
    raise CompressError(f"bad compression spec {text!r}: {why}. {fix}")


def parse_spec(text: str | Spec) -> Spec:
    """Parse a spec string (a Spec passes through). Raises ValueError naming the problem and the fix."""
    if isinstance(text, Spec):
        return text
    if not isinstance(text, str):
        raise CompressError(f"compression spec must be a string like 'sjlt-4096', got {type(text).__name__}")
    m = _SPEC_RE.match(text.strip().lower())
    if m is None:
        _fail(text, "not of the form TYPE, TYPE-DIM or TYPE-DIMin*DIMout[:s=N]",
              "Examples: 'sjlt-4096', 'random_mask-128*128', 'sjlt-4096:s=4', 'identity'")
    kind, a, b, opts = m.groups()
    if kind not in KINDS:
        _fail(text, f"unknown type {kind!r}", f"Valid types: {', '.join(KINDS)}")
    dims = tuple(int(x) for x in (a, b) if x is not None)
    if any(d <= 0 for d in dims):
        _fail(text, "dimensions must be positive integers", "Use e.g. 'sjlt-4096'")
    if not dims and kind != "identity":
        _fail(text, f"type {kind!r} needs a target dimension", f"Write e.g. '{kind}-4096'")
    if len(dims) == 2 and kind not in FACTORABLE:
        _fail(text, f"type {kind!r} cannot be factored (A*B)",
              "For FactGraSS use sparsification 'random_mask-A*B' with projection 'sjlt-K'")
    kw: dict = {}
    if opts is not None:
        allowed = _OPTIONS.get(kind, ())
        for item in opts.split(","):
            key, eq, val = item.partition("=")
            if key not in allowed:
                _fail(text, f"option {key!r} is not valid for {kind!r}",
                      f"Valid options: {', '.join(allowed) or 'none'}")
            if not eq or not val.isdigit() or int(val) <= 0:
                _fail(text, f"option {key!r} needs a positive integer value", f"Write e.g. ':{key}=4'")
            kw[key] = int(val)
    if kw.get("mask") is not None and kw["mask"] < dims[0]:
        _fail(text, f"the grass mask size {kw['mask']} is smaller than the output dim {dims[0]}",
              "The mask keeps k' >= k coordinates before the SJLT; raise mask= or drop it")
    return Spec(kind, dims, **kw)
