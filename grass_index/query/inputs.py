"""Query examples from a file (.pt, .npy, .npz): what `query --input` and the HTTP API's
upload read. Nothing here unpickles: .pt goes through ``torch.load(weights_only=True)`` and
numpy files are read with ``allow_pickle=False``, so an uploaded file cannot run code.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from ..indexdir.errors import AttributionError

SUFFIXES = (".pt", ".npy", ".npz")


class InputError(AttributionError):
    """An examples file is missing, unreadable or holds no batch of examples."""


def load_examples(source, *, name: str | None = None, suffix: str | None = None,
                  budget=None) -> list:
    """Examples from a path or from the file's bytes (then ``name`` or ``suffix`` gives the type).

    .pt holds a torch.save'd list/tensor/dict, .npy an array, .npz named arrays. A tensor is
    split along its first dimension; a dict of equal-length arrays becomes tuples in key
    order (e.g. an npz with x and y gives (x[i], y[i])); float64 arrays become float32.
    With a ``budget`` (an ``input_budget.InputBudget``: what `serve` allows per request), the
    file's headers are checked against it before anything is unpacked (InputRefused).
    """
    import numpy as np
    import torch

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise InputError(f"{name} not found; pass an existing .pt, .npy or .npz file")
        suffix = suffix or path.suffix
        data = path
    elif isinstance(source, (bytes, bytearray)):
        name = name or "upload"
        suffix = suffix or Path(name).suffix
        data = io.BytesIO(bytes(source))
    else:
        raise InputError(f"load_examples takes a path or bytes, got {type(source).__name__}")
    suffix = (suffix or "").lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{name}: unknown file type {suffix or '(none)'!r}; use .pt, .npy "
                         "or .npz")
    if budget is not None:
        from ..input_budget import check_file

        check_file(data.getvalue() if isinstance(data, io.BytesIO) else data.read_bytes(),
                   suffix, name, budget)
    try:
        if suffix == ".pt":
            obj = torch.load(data, weights_only=True)
        elif suffix == ".npy":
            obj = np.load(data, allow_pickle=False)
        else:
            with np.load(data, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(f"{name} is unreadable as {suffix}: {type(e).__name__}: {e}") from e
    if budget is not None:
        from ..input_budget import check_rows

        check_rows(obj, name, budget)
    return _split(_to_torch(obj, name), name)


def _to_torch(x, name: str):
    import numpy as np
    import torch

    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufc" or x.dtype.fields is not None:
            raise InputError(f"{name} holds {x.dtype} values; examples are numeric arrays "
                             "(e.g. float32 features or int64 token ids)")
        t = torch.from_numpy(x.copy())
        return t.float() if t.dtype == torch.float64 else t
    if isinstance(x, (list, tuple)):
        return type(x)(_to_torch(v, name) for v in x)
    if isinstance(x, dict):
        return {k: _to_torch(v, name) for k, v in x.items()}
    return x


def _split(obj, name: str) -> list:
    import torch

    if isinstance(obj, dict):
        arrays = list(obj.values())
        if not arrays:
            raise InputError(f"{name} holds no arrays; expected a batch of examples")
        try:
            lens = {len(a) for a in arrays}
        except TypeError:
            raise InputError(f"{name}: every entry must be an array with one row per "
                             "example") from None
        if len(lens) != 1:
            raise InputError(f"{name}: arrays {list(obj)} have different lengths "
                             f"{sorted(lens)}; give one row per example in each")
        return [tuple(a[i] for a in arrays) for i in range(lens.pop())]
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise InputError(f"{name} holds a scalar; expected a batch of examples (one row "
                             "per example)")
        return [obj[i] for i in range(obj.shape[0])]
    if isinstance(obj, (list, tuple)):
        return list(obj)
    raise InputError(f"{name} holds {type(obj).__name__}; expected a list of examples, a "
                     "tensor or a dict of arrays")
