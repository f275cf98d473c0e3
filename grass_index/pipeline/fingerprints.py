"""Fingerprints: of a config (what a build/index depends on), of the model (a different model
must not resume a build), of a training set and each of its examples, and of their shapes."""
from __future__ import annotations

import hashlib
import json
import pickle
from typing import Sequence

import numpy as np
import torch

from ..task import item_signature, merge_signatures
from .files import _jsonable


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: dict) -> str:
    return _hash({k: v for k, v in cfg.items() if k not in ("config_hash", "created")})


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def model_hash(model: torch.nn.Module, layers=None) -> str:
    """Fingerprint of every parameter and buffer (by name, dtype, shape and value): weights
    outside the attributed layers change every gradient too, so a model that differs anywhere
    must not resume a build. ``layers`` is accepted for callers that pass it; unused."""
    h = hashlib.sha256()
    named = [("param:" + n, t) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [("buffer:" + n, t) for n, t in model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def _leaves(x, out):
    if isinstance(x, torch.Tensor):
        out.append(f"t{x.dtype}{tuple(x.shape)}".encode())
        out.append(_tensor_bytes(x))
    elif isinstance(x, np.ndarray):
        out.append(f"a{x.dtype}{x.shape}".encode())
        out.append(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, dict):
        out.append(b"{")
        for k in sorted(x, key=str):
            out.append(repr(k).encode())
            _leaves(x[k], out)
        out.append(b"}")
    elif isinstance(x, (list, tuple)):
        out.append(b"(")
        for v in x:
            _leaves(v, out)
        out.append(b")")
    elif x is None or isinstance(x, (str, bytes, int, float, bool, complex)):
        out.append(repr(x).encode())
    else:  # other objects: their pickle (a default repr would hold a memory address)
        try:
            out.append(pickle.dumps(x, protocol=4))
        except Exception:
            out.append(type(x).__qualname__.encode())
    return out


DIGEST_BYTES = 16  # per example: collisions need 2**64 work; 16 MB per million examples


def example_digest(item) -> bytes:
    """Fingerprint of one training example (every tensor's bytes, dtype and shape)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for b in _leaves(item, []):
        h.update(b)
    return h.digest()


def first_difference(stored: bytes, now: bytes) -> int | None:
    """Position (within a block) of the first example whose digest differs, or None."""
    n = DIGEST_BYTES
    for j in range(max(len(stored), len(now)) // n):
        if stored[j * n:(j + 1) * n] != now[j * n:(j + 1) * n]:
            return j
    return None


def data_hash(data: Sequence) -> str:
    """Cheap fingerprint of a training set: its length and its first and last examples (every
    example is fingerprinted per block as pass 1 reads it, see ``example_digest``)."""
    n = len(data)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({0, n - 1}):
        for b in _leaves(data[i], []):
            h.update(b)
    return h.hexdigest()[:16]


SIGNATURE_SAMPLES = 64


def _data_signature(data: Sequence):
    """Shape/dtype structure that query examples must match, from <= 64 evenly spaced items
    (dims that differ among them become variable; see task.merge_signatures)."""
    n = len(data)
    m = min(n, SIGNATURE_SAMPLES)
    picks = sorted({round(i * (n - 1) / max(1, m - 1)) for i in range(m)})
    sig = None
    for i in picks:
        sig = merge_signatures(sig, item_signature(data[i]))
    return sig


def _layer_dims(layers) -> list[dict]:
    return [dict(name=l.name, kind=l.kind, d_in=l.d_in, d_out=l.d_out, has_bias=l.has_bias,
                 numel=l.numel, params=list(l.param_names)) for l in layers]
