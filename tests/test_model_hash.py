"""The model hash: a sha256 tree over every parameter and buffer, hashed in parallel threads
(tagged ``sha256-tree:``), and the untagged one-thread sha256 that older indexes recorded,
which must still verify (query warning, build resume, repair)."""
from __future__ import annotations

import copy
import hashlib
import json
import logging

import pytest
import torch
from torch import nn

import grass_index as gi
from grass_index.indexdir import fingerprints as fp
from test_pipeline import loss_fn, make_data


def model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3), nn.BatchNorm1d(3))
    return m.eval()


def reference_tree_hash(m, leaf):
    """The tree hash spelled out sequentially: it pins the format new indexes record."""
    root = hashlib.sha256()
    named = [("param:" + n, t) for n, t in m.named_parameters()]
    named += [("buffer:" + n, t) for n, t in m.named_buffers()]
    for name, t in named:
        data = t.detach().contiguous().numpy().tobytes()
        root.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\n")
        for lo in range(0, len(data), leaf):
            root.update(hashlib.sha256(data[lo:lo + leaf]).digest())
    return fp.MODEL_HASH_TAG + root.hexdigest()[:16]


def reference_legacy_hash(m):
    """grass-index's model hash before tagged hashes, as it was written."""
    h = hashlib.sha256()
    named = [("param:" + n, t) for n, t in m.named_parameters()]
    named += [("buffer:" + n, t) for n, t in m.named_buffers()]
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("leaf,threads,in_flight", [(fp.LEAF_BYTES, 2, fp.IN_FLIGHT_BYTES),
                                                    (256, 1, 1), (256, 4, 1 << 20)])
def test_tree_hash_equals_its_sequential_definition_for_any_threads_or_memory_bound(
        monkeypatch, leaf, threads, in_flight):
    m = model()
    monkeypatch.setattr(fp, "LEAF_BYTES", leaf)
    monkeypatch.setattr(fp, "IN_FLIGHT_BYTES", in_flight)
    monkeypatch.setattr(fp, "_hash_threads", lambda: threads)
    assert fp.model_hash(m) == reference_tree_hash(m, leaf)


def test_a_strided_weight_hashes_as_its_values():
    m, t = model(), model()
    with torch.no_grad():  # the same values, stored transposed (not contiguous)
        w = t[0].weight.detach().clone()
        t[0].weight = nn.Parameter(w.t().contiguous().t())
    assert not t[0].weight.is_contiguous()
    assert fp.model_hash(t) == fp.model_hash(m)


def test_any_change_anywhere_changes_the_tree_hash(monkeypatch):
    monkeypatch.setattr(fp, "LEAF_BYTES", 256)  # the first weight spans 19 leaves
    base = fp.model_hash(model())
    assert fp.model_hash(copy.deepcopy(model())) == base
    changed = []
    for edit in ("weight_late_leaf", "bias", "buffer", "dtype", "extra_buffer"):
        m = model()
        with torch.no_grad():
            if edit == "weight_late_leaf":
                m[0].weight.view(-1)[-1] += 1e-6
            elif edit == "bias":
                m[2].bias[0] += 1e-6
            elif edit == "buffer":
                m[3].running_var[1] += 1e-6
            elif edit == "dtype":
                m = m.double()
            else:
                m.register_buffer("temperature", torch.tensor(2.0))
        changed.append(fp.model_hash(m))
    assert base not in changed and len(set(changed)) == len(changed)


def test_legacy_hashes_are_recomputed_with_the_legacy_function():
    m = model()
    old = reference_legacy_hash(m)
    assert fp.legacy_model_hash(m) == old
    assert fp.model_hash(m, like=old) == old
    assert fp.model_hash(m, like="0123456789abcdef") == old  # any untagged record
    assert fp.model_hash(m, like=fp.model_hash(m)) == fp.model_hash(m)
    ms = [model(0), model(1)]
    assert fp.model_fingerprint(ms, like=old) == fp.hash_json(
        ["checkpoints", reference_legacy_hash(ms[0]), reference_legacy_hash(ms[1])])
    assert fp.model_fingerprint(ms).startswith(fp.MODEL_HASH_TAG)


def _build(m, out):
    return gi.build_index(m, make_data(24, 1), loss_fn, out, sparsification="random_mask-4*3",
                          projection="sjlt-8", batch_size=8, progress=False)


def _like_an_older_version(monkeypatch):
    """This grass-index, but recording untagged legacy hashes (as versions before did)."""
    monkeypatch.setattr(fp, "tree_model_hash", fp.legacy_model_hash)


def test_an_index_with_a_legacy_hash_checks_the_query_model(tmp_path, monkeypatch, caplog):
    from test_pipeline import make_model
    with monkeypatch.context() as mp:
        _like_an_older_version(mp)
        idx = _build(make_model(), tmp_path / "idx")
    assert idx.config["model_hash"] == reference_legacy_hash(make_model())
    q = make_data(3, 2)
    with caplog.at_level(logging.WARNING, logger="grass_index"):
        gi.open_index(tmp_path / "idx").query(make_model(), q, loss_fn, k=3)
    assert not [r for r in caplog.records if "weights differ" in r.getMessage()]
    other = make_model()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    with caplog.at_level(logging.WARNING, logger="grass_index"):
        gi.open_index(tmp_path / "idx").query(other, q, loss_fn, k=3)
    assert [r for r in caplog.records if "weights differ" in r.getMessage()]


def test_a_build_an_older_version_started_resumes_and_still_refuses_another_model(
        tmp_path, monkeypatch):
    from test_pipeline import make_model
    out = tmp_path / "idx"
    with monkeypatch.context() as mp:
        _like_an_older_version(mp)
        first = _build(make_model(), out)
    again = _build(make_model(), out)  # this version: the same model matches the old record
    assert again.config["model_hash"] == first.config["model_hash"]
    other = make_model()
    with torch.no_grad():
        other[2].bias[0] += 1e-3
    with pytest.raises(gi.AttributionError, match="model's weights differ"):
        _build(other, out)
