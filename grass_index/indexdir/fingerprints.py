"""Fingerprints: of a config (what a build/index depends on), of the model (a different model
must not resume a build), of a training set and each of its examples, and of their shapes."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from ..capture import as_checkpoints
from ..capture.ensemble import single_model
from ..fileio import jsonable
from ..signature import item_signature, merge_signatures


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: dict) -> str:
    return hash_json({k: v for k, v in cfg.items() if k not in ("config_hash", "created")})


def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    try:
        return memoryview(t.numpy()).cast("B")
    except (TypeError, RuntimeError, ValueError):  # dtypes numpy lacks (bfloat16, ...)
        return t.reshape(-1).view(torch.uint8).numpy()


def legacy_model_hash(model: torch.nn.Module) -> str:
    """The model hash of grass-index before tagged hashes (one sha256 over every tensor's
    bytes, in one thread): recorded by older indexes, still checked against them."""
    h = hashlib.sha256()
    for name, t in _named_tensors(model):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def _named_tensors(model: torch.nn.Module):
    named = [("param:" + n, t) for n, t in model.named_parameters()]
    return named + [("buffer:" + n, t) for n, t in model.named_buffers()]


MODEL_HASH_TAG = "sha256-tree:"  # prefixes a model hash made by ``tree_model_hash``
LEAF_BYTES = 4 << 20  # a tensor's bytes are hashed in leaves of 4 MiB, in parallel threads
IN_FLIGHT_BYTES = 256 << 20  # copies (non-CPU or strided tensors) held while hashing


def _hash_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def _leaf(buf) -> bytes:
    return hashlib.sha256(buf).digest()  # hashlib releases the GIL over large buffers


def tree_model_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes) as a two-level tree:
    each tensor's bytes in 4 MiB leaves hashed by sha256 in parallel threads, the root a
    sha256 over each tensor's header and its leaves' full digests (fixed length, so the
    encoding is unambiguous: as strong as one sha256 over the bytes, ~threads× faster)."""
    pending: list = []  # (tensor header, [leaf futures]) in model order
    in_flight: deque = deque()  # (future, bytes) of leaves not known done, oldest first
    held = 0
    with ThreadPoolExecutor(_hash_threads(), thread_name_prefix="grass-hash") as pool:
        for name, t in _named_tensors(model):
            buf = _tensor_bytes(t)
            leaves = []
            for lo in range(0, len(buf), LEAF_BYTES):
                piece = buf[lo:lo + LEAF_BYTES]
                f = pool.submit(_leaf, piece)
                leaves.append(f)
                in_flight.append((f, len(piece)))
                held += len(piece)
            pending.append((json.dumps([name, str(t.dtype), list(t.shape)]), leaves))
            del buf
            while held > IN_FLIGHT_BYTES:  # bound the memory copies of tensors hold
                f, n = in_flight.popleft()
                f.result()
                held -= n
        root = hashlib.sha256()
        for header, leaves in pending:
            root.update(header.encode() + b"\n")
            for f in leaves:
                root.update(f.result())
    return MODEL_HASH_TAG + root.hexdigest()[:16]


def model_hash(model: torch.nn.Module, layers=None, *, like: str | None = None) -> str:
    """Fingerprint of every parameter and buffer (by name, dtype, shape and value): weights
    outside the attributed layers change every gradient too, so a model that differs anywhere
    must not resume a build. ``like``: a recorded hash, to compute this model's hash with the
    function that one was made with (an index of an older grass-index holds an untagged
    ``legacy_model_hash``); by default ``tree_model_hash``. ``layers`` is accepted for
    callers that pass it; unused."""
    if like is not None and not like.startswith(MODEL_HASH_TAG):
        return legacy_model_hash(model)
    return tree_model_hash(model)


def model_fingerprint(model, *, like: str | None = None) -> str:
    """``model_hash`` of one model; of an ensemble (a list of checkpoints), one hash over every
    checkpoint's, in order: a build or query must not mix in another checkpoint either.
    ``like`` as for ``model_hash``."""
    models = as_checkpoints(model)
    if models is None:
        return model_hash(single_model(model), like=like)
    combined = hash_json(["checkpoints", *(model_hash(m, like=like) for m in models)])
    tagged = like is None or like.startswith(MODEL_HASH_TAG)
    return MODEL_HASH_TAG + combined if tagged else combined


def _feed(h, x) -> None:
    """Update hash ``h`` with one example's structure and leaf values."""
    if isinstance(x, torch.Tensor):
        h.update(f"t{x.dtype}{tuple(x.shape)}".encode())
        h.update(_tensor_bytes(x))
    elif isinstance(x, np.ndarray):
        h.update(f"a{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes() if x.dtype.hasobject else
                 memoryview(np.ascontiguousarray(x)).cast("B"))
    elif isinstance(x, dict):
        h.update(b"{")
        for k in sorted(x, key=str):
            h.update(repr(k).encode())
            _feed(h, x[k])
        h.update(b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"(")
        for v in x:
            _feed(h, v)
        h.update(b")")
    elif x is None or isinstance(x, (str, bytes, int, float, bool, complex)):
        h.update(repr(x).encode())
    else:  # other objects: their pickle (a default repr would hold a memory address)
        try:
            h.update(pickle.dumps(x, protocol=4))
        except Exception:
            h.update(type(x).__qualname__.encode())


DIGEST_BYTES = 16  # per example: collisions need 2**64 work; 16 MB per million examples


def example_digest(item) -> bytes:
    """Fingerprint of one training example (every tensor's bytes, dtype and shape)."""
    h = hashlib.sha256()
    _feed(h, item)
    return h.digest()[:DIGEST_BYTES]


DIGEST_TAG = b"gi-sha256-16:"  # prefixes a block's digests: names how they were computed


def block_digest(items) -> bytes:
    """The data fingerprint stored with a block: one example_digest per example."""
    return DIGEST_TAG + b"".join(example_digest(x) for x in items)


def first_difference(stored: bytes, now: bytes) -> int | None:
    """Position (within a block) of the first example whose digest differs, or None (also
    when ``stored`` was computed another way, e.g. by another grass-index version: it cannot
    be compared, and the check is skipped)."""
    if not (stored.startswith(DIGEST_TAG) and now.startswith(DIGEST_TAG)):
        return None
    stored, now = stored[len(DIGEST_TAG):], now[len(DIGEST_TAG):]
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
        _feed(h, data[i])
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
