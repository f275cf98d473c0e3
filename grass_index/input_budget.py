"""How much an examples file may unpack to, checked from its headers before anything is read.

An upload is small on the wire but its headers declare what the reader will allocate: a .npy
header its shape and dtype, an .npz (a zip) each member's uncompressed size, a torch.save .pt
(also a zip) each record's size. Deflate packs zeros ~1000:1, so an 8 MiB body could unpack to
GBs, and a header can declare 1e12 elements over a few bytes of data. ``check_file`` reads only
those headers (numpy's own ``read_magic``/``read_array_header_*``, zipfile's ``file_size``) and
refuses a file whose declared contents exceed an ``InputBudget``: a byte total derived from the
index's item signature (what one example holds) times the examples allowed per request.
``check_rows`` then bounds the examples a loaded object splits into (one tensor each).
"""
from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass

from .errors import GrassIndexError

# Elements allowed for an example's variable-length part (token ids: any real context fits).
OPEN_ELEMENTS = 16_384
# Every numeric element is budgeted at 8 bytes (float64 and int64 uploads are converted or
# accepted), plus room for headers, labels and a torch.save pickle.
BYTES_PER_ELEMENT = 8
SLACK_BYTES = 1 << 20
PICKLE_BYTES = 256 << 10        # torch.save's data.pkl: structure only, the arrays are records
MAX_MEMBERS = 1024              # arrays in an .npz, records in a .pt
NUMERIC_KINDS = "biufc"         # bool, int, uint, float, complex: nothing else is an example


class InputRefused(GrassIndexError, ValueError):
    """An examples file declares more (or other) data than a request may hold."""


@dataclass(frozen=True)
class InputBudget:
    """At most ``max_items`` examples and ``max_bytes`` of unpacked array data per file."""

    max_items: int
    max_bytes: int

    @classmethod
    def for_signature(cls, signature, max_items: int) -> "InputBudget":
        """The budget for ``max_items`` examples shaped like the index's item signature (an
        unknown or mixed signature is budgeted as one variable-length tensor per example)."""
        per_example = signature_elements(signature) * BYTES_PER_ELEMENT
        return cls(max_items=max_items, max_bytes=max_items * per_example + SLACK_BYTES)


def signature_elements(sig) -> int:
    """Elements one example holds at most (see grass_index/signature.py for the format)."""
    if not isinstance(sig, dict) or "other" in sig:
        return OPEN_ELEMENTS
    if "tensor" in sig:
        dims = sig["tensor"] or []
        known = math.prod(d for d in dims if d is not None)
        return known * (OPEN_ELEMENTS if None in dims else 1)
    if "seq" in sig:
        return sum(signature_elements(s) for s in sig["seq"]) or 1
    if "dict" in sig:
        return sum(signature_elements(s) for s in sig["dict"].values()) or 1
    return 1  # a scalar


def check_file(data: bytes, suffix: str, name: str, budget: InputBudget) -> None:
    """Refuse ``data`` (a whole .npy/.npz/.pt file) if its headers declare more than the budget
    allows or anything but numeric arrays; reads headers only, allocates nothing big."""
    if suffix == ".npy":
        check_npy(io.BytesIO(data), len(data), name, budget)
    elif suffix == ".npz":
        check_zip(data, name, budget, npy_members=True)
    elif suffix == ".pt":
        check_zip(data, name, budget, npy_members=False)


def check_npy(fp, available: int, name: str, budget: InputBudget) -> int:
    """Check one .npy stream's header: numeric dtype, at most ``max_items`` rows, and data that
    fits both the budget and the ``available`` bytes after the header. Returns its data bytes."""
    from numpy.lib import format as npformat

    start = fp.tell()
    try:
        version = npformat.read_magic(fp)
        read_header = (npformat.read_array_header_1_0 if version == (1, 0)
                       else npformat.read_array_header_2_0)
        shape, _, dtype = read_header(fp, max_header_size=10_000)
    except Exception as e:  # a bad magic string, header or version
        raise InputRefused(f"{name} is unreadable as .npy: {e}; save it with numpy.save") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None:
        raise InputRefused(f"{name} holds {dtype} values; examples are numeric arrays (save "
                           "numbers, e.g. float32 features or int64 token ids)")
    if shape and shape[0] > budget.max_items:
        raise InputRefused(f"{name} holds {shape[0]} examples, over the limit of "
                           f"{budget.max_items} per request; split it into smaller files")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > budget.max_bytes:
        raise InputRefused(f"{name} declares {_size(nbytes)} of {dtype} {list(shape)}, over "
                           f"this server's {_size(budget.max_bytes)} per request; send fewer "
                           "or smaller examples")
    if nbytes > available - (fp.tell() - start):
        raise InputRefused(f"{name} is truncated: its header declares {_size(nbytes)} of data "
                           "but the file is shorter; save it again with numpy.save")
    return nbytes


def check_zip(data: bytes, name: str, budget: InputBudget, npy_members: bool) -> None:
    """An .npz or a torch.save .pt: the members' declared sizes (which bound what zipfile and
    torch's reader unpack) must fit the budget; an .npz member's own .npy header is checked."""
    try:
        members = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        kind = "an .npz (numpy.savez)" if npy_members else "a .pt (torch.save, zip format)"
        raise InputRefused(f"{name} is unreadable: not {kind} file ({e})") from None
    if len(members) > MAX_MEMBERS:
        raise InputRefused(f"{name} holds {len(members)} files, over the limit of {MAX_MEMBERS}; "
                           "send one array per part of an example")
    total = sum(m.file_size for m in members)
    if total > budget.max_bytes:
        raise InputRefused(f"{name} unpacks to {_size(total)}, over this server's "
                           f"{_size(budget.max_bytes)} per request; send fewer or smaller "
                           "examples")
    if not npy_members:
        pickles = [m for m in members if m.filename.endswith("data.pkl")]
        if len(pickles) != 1 or pickles[0].file_size > PICKLE_BYTES:
            raise InputRefused(f"{name} is not a torch.save file of examples (a data.pkl of "
                               f"at most {_size(PICKLE_BYTES)}); save a tensor, a list of "
                               "examples or a dict of tensors with torch.save")
        return
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for m in members:
            with z.open(m) as fp:
                check_npy(_Counted(fp), m.file_size, f"{name}:{m.filename}", budget)


class _Counted:
    """A read-only stream that knows its position (zip member streams may not)."""

    def __init__(self, fp):
        self.fp, self.pos = fp, 0

    def read(self, n: int = -1) -> bytes:
        b = self.fp.read(n)
        self.pos += len(b)
        return b

    def tell(self) -> int:
        return self.pos


def check_rows(obj, name: str, budget: InputBudget) -> None:
    """After loading, before splitting into one tensor per example: at most ``max_items``."""
    if isinstance(obj, dict):
        rows = max((len(v) for v in obj.values() if hasattr(v, "__len__")), default=0)
    elif hasattr(obj, "shape") and len(obj.shape) > 0:
        rows = obj.shape[0]
    elif isinstance(obj, (list, tuple)):
        rows = len(obj)
    else:
        return
    if rows > budget.max_items:
        raise InputRefused(f"{name} holds {rows} examples, over the limit of "
                           f"{budget.max_items} per request; split it into smaller files")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover
