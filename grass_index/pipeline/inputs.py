"""Examples from a file, for query/score without a task's query data: .pt (torch.save'd
list/tensor/dict, loaded with weights_only=True), .npy, .npz (loaded without pickle)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import AttributionError


def _tensors(x):
    """numpy arrays -> tensors (float64 -> float32, what models take), recursively."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(x.copy())
        return t.float() if t.dtype == torch.float64 else t
    if isinstance(x, (list, tuple)):
        return type(x)(_tensors(v) for v in x)
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    return x


def load_examples(path) -> list:
    """The examples a file holds, as a list of items like ``train_data[i]``. A dict of
    equal-length arrays becomes tuples (in key order), e.g. an .npz with x and y."""
    path = Path(path)
    if not path.is_file():
        raise AttributionError(f"--input {path} not found")
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".npy", ".npz"):
        raise AttributionError(f"--input {path}: unknown file type {suffix!r}; use .pt, .npy "
                               "or .npz")
    try:
        if suffix == ".pt":
            obj = torch.load(path, weights_only=True)
        elif suffix == ".npy":
            obj = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
    except Exception as e:
        raise AttributionError(f"--input {path} is unreadable: {type(e).__name__}: {e}") from e
    obj = _tensors(obj)
    if isinstance(obj, dict):
        arrays = list(obj.values())
        lens = {len(a) for a in arrays}
        if len(lens) != 1:
            raise AttributionError(f"--input {path}: arrays {list(obj)} have different lengths "
                                   f"{sorted(lens)}")
        return [tuple(a[i] for a in arrays) for i in range(lens.pop())]
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise AttributionError(f"--input {path} holds a scalar; expected a batch of examples")
        return [obj[i] for i in range(obj.shape[0])]
    if isinstance(obj, (list, tuple)):
        return list(obj)
    raise AttributionError(f"--input {path} holds {type(obj).__name__}; expected a list of "
                           "examples, a tensor or a dict of arrays")
