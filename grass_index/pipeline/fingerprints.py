"""Fingerprints: of a config (what a build/index depends on), of the attributed parameters
(a different model must not resume a build), of a training set, and of its items' shapes."""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np
import torch

from ..fileio import jsonable
from ..signature import item_signature, merge_signatures


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: dict) -> str:
    return hash_json({k: v for k, v in cfg.items() if k not in ("config_hash", "created")})


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def model_hash(model: torch.nn.Module, layers) -> str:
    """Fingerprint of the attributed parameters (a different model must not resume a build)."""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for layer in layers:
        for name in layer.param_names:
            h.update(name.encode())
            h.update(_tensor_bytes(params[name]))
    return h.hexdigest()[:16]


def _leaves(x, out):
    if isinstance(x, torch.Tensor):
        out.append(_tensor_bytes(x))
    elif isinstance(x, np.ndarray):
        out.append(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            _leaves(x[k], out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _leaves(v, out)
    else:
        out.append(repr(x).encode())
    return out


def data_hash(data: Sequence) -> str:
    """Cheap fingerprint of a training set: its length and its first and last examples."""
    n = len(data)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({0, n - 1}):
        for b in _leaves(data[i], []):
            h.update(b)
    return h.hexdigest()[:16]


SIGNATURE_SAMPLES = 64


def data_signature(data: Sequence):
    """Shape/dtype structure that query examples must match, from <= 64 evenly spaced items
    (dims that differ among them become variable; see signature.merge_signatures)."""
    n = len(data)
    m = min(n, SIGNATURE_SAMPLES)
    picks = sorted({round(i * (n - 1) / max(1, m - 1)) for i in range(m)})
    sig = None
    for i in picks:
        sig = merge_signatures(sig, item_signature(data[i]))
    return sig


def layer_dims(layers) -> list[dict]:
    return [dict(name=l.name, kind=l.kind, d_in=l.d_in, d_out=l.d_out, has_bias=l.has_bias,
                 numel=l.numel, params=list(l.param_names)) for l in layers]
