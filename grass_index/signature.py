"""The structure of an example (nesting, tensor shapes, dtypes) as JSON: recorded from the
training set at build time, so a wrongly shaped query gets a clear error instead of a shape
error deep inside the model. Used by the pipeline (recording, checking) and re-exported by
grass_index.task for task authors."""
from __future__ import annotations

from typing import Any

import torch



def item_signature(item) -> Any:
    """JSON-able structure of one example: nesting, tensor shapes and dtypes. Integer tensors
    (token ids, indices) have variable length by nature, so their sizes are left open (None);
    their number of dims and dtype still have to match."""
    if isinstance(item, torch.Tensor):
        shape = [None] * item.dim() if not (item.is_floating_point() or item.is_complex()) \
            else list(item.shape)
        return {"tensor": shape, "dtype": str(item.dtype).replace("torch.", "")}
    try:
        import numpy as np

        if isinstance(item, np.ndarray):
            shape = list(item.shape) if item.dtype.kind in "fc" else [None] * item.ndim
            return {"tensor": shape, "dtype": str(item.dtype)}
    except ImportError:  # pragma: no cover
        pass
    if isinstance(item, dict):
        return {"dict": {str(k): item_signature(v) for k, v in item.items()}}
    if isinstance(item, (list, tuple)):
        return {"seq": [item_signature(v) for v in item]}
    if isinstance(item, bool):
        return {"scalar": "bool"}
    if isinstance(item, int):
        return {"scalar": "int"}
    if isinstance(item, float):
        return {"scalar": "float"}
    return {"other": type(item).__name__}


def merge_signatures(a, b):
    """Signature of a set of examples: dims that differ (variable length) become None."""
    if a is None:
        return b
    if set(a) != set(b):
        return {"other": "mixed"}
    if "tensor" in a:
        if len(a["tensor"]) != len(b["tensor"]) or a["dtype"] != b["dtype"]:
            return {"other": "mixed"}
        return {"tensor": [x if x == y else None for x, y in zip(a["tensor"], b["tensor"])],
                "dtype": a["dtype"]}
    if "seq" in a:
        if len(a["seq"]) != len(b["seq"]):
            return {"other": "mixed"}
        return {"seq": [merge_signatures(x, y) for x, y in zip(a["seq"], b["seq"])]}
    if "dict" in a:
        if set(a["dict"]) != set(b["dict"]):
            return {"other": "mixed"}
        return {"dict": {k: merge_signatures(a["dict"][k], b["dict"][k]) for k in a["dict"]}}
    return a if a == b else {"other": "mixed"}


def signature_mismatch(expected, got, path: str = "example") -> str | None:
    """Human description of the first way `got` does not fit `expected`, or None."""
    if expected is None or "other" in expected:
        return None
    if "tensor" in expected:
        if "tensor" not in got:
            return f"{path}: expected a tensor {_fmt(expected)}, got {_fmt(got)}"
        es, gs = expected["tensor"], got["tensor"]
        if expected["dtype"] != got["dtype"]:  # first: an int array's sizes are left open
            return (f"{path}: expected dtype {expected['dtype']}, got {got['dtype']} (convert "
                    f"it, e.g. x.astype('{expected['dtype']}') in numpy or "
                    f"x.to(torch.{expected['dtype']}))")
        if len(es) != len(gs) or any(e is not None and e != g for e, g in zip(es, gs)):
            return f"{path}: expected shape {_shape(es)}, got {_shape(gs)}"
        return None
    if "seq" in expected:
        if "seq" not in got or len(got["seq"]) != len(expected["seq"]):
            return (f"{path}: expected a tuple of {len(expected['seq'])} parts like the training "
                    f"examples, got {_fmt(got)}")
        for i, (e, g) in enumerate(zip(expected["seq"], got["seq"])):
            msg = signature_mismatch(e, g, f"{path}[{i}]")
            if msg:
                return msg
        return None
    if "dict" in expected:
        if "dict" not in got or set(got["dict"]) != set(expected["dict"]):
            return f"{path}: expected a dict with keys {sorted(expected['dict'])}, got {_fmt(got)}"
        for k, e in expected["dict"].items():
            msg = signature_mismatch(e, got["dict"][k], f"{path}[{k!r}]")
            if msg:
                return msg
        return None
    if "scalar" in expected and got != expected:
        return f"{path}: expected a {expected['scalar']}, got {_fmt(got)}"
    return None


def _shape(s):
    return "[" + ", ".join("*" if x is None else str(x) for x in s) + "]"


def _fmt(sig) -> str:
    if "tensor" in sig:
        return f"{sig['dtype']}{_shape(sig['tensor'])}"
    if "seq" in sig:
        return "(" + ", ".join(_fmt(s) for s in sig["seq"]) + ")"
    if "dict" in sig:
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in sig["dict"].items()) + "}"
    if "scalar" in sig:
        return sig["scalar"]
    return sig.get("other", "?")
