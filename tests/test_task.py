"""Loading task files: paths, module:attr, and clear errors for broken tasks."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from grass_index.task import (TaskError, item_signature, load_task, merge_signatures,
                              signature_mismatch)


GOOD = """
import torch
from torch import nn
def model(): return nn.Linear(3, 2)
def train_data(): return [(torch.randn(3), torch.tensor(1)) for _ in range(4)]
def loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")
"""


def test_load_path_and_check_loss(tmp_path):
    p = tmp_path / "t.py"
    p.write_text(GOOD)
    t = load_task(str(p))
    assert t.ref == str(p.resolve())
    m = t.model()
    assert not m.training  # eval mode is set by us
    t.check_loss(m, t.train_data())
    assert not t.has("query_data")
    with pytest.raises(TaskError, match="no query_data"):
        t.query_data()


def test_module_attr_reference(monkeypatch):
    ns = types.SimpleNamespace(model=lambda: torch.nn.Linear(2, 2), train_data=lambda: [1, 2],
                               loss=lambda m, b: b)
    mod = types.ModuleType("my_tasks_mod")
    mod.digits_like = ns
    monkeypatch.setitem(sys.modules, "my_tasks_mod", mod)
    t = load_task("my_tasks_mod:digits_like")
    assert t.ref == "my_tasks_mod:digits_like" and len(t.train_data()) == 2


def test_missing_function_named(tmp_path):
    p = tmp_path / "t.py"
    p.write_text(GOOD.replace("def loss(", "def los("))
    with pytest.raises(TaskError, match=r"missing loss\(\)"):
        load_task(p)


def test_missing_file_and_module():
    with pytest.raises(TaskError, match="not found"):
        load_task("/no/such/task.py")
    with pytest.raises(TaskError, match="not found"):
        load_task("no_such_module_xyz")


def test_task_file_that_raises(tmp_path):
    p = tmp_path / "t.py"
    p.write_text("raise RuntimeError('boom')")
    with pytest.raises(TaskError, match="failed to load: RuntimeError: boom"):
        load_task(p)


def test_scalar_loss_detected(tmp_path):
    p = tmp_path / "t.py"
    p.write_text(GOOD.replace('reduction="none"', 'reduction="mean"'))
    t = load_task(p)
    with pytest.raises(TaskError, match="one loss per example"):
        t.check_loss(t.model(), t.train_data())


@pytest.mark.slow  # trains the MLP from scratch (a second idle, ~50 s on a loaded 2-core box)
def test_bundled_digits_task_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASS_INDEX_CACHE", str(tmp_path))
    t = load_task(None)
    assert t.ref.endswith("digits.py")
    data, q = t.train_data(), t.query_data()
    assert len(data) == 1437 and len(q) == 360
    m = t.model()
    x, y = q.tensors
    assert (m(x).argmax(1) == y).float().mean() > 0.9  # it really trained
    assert list(tmp_path.glob("digits_mlp_*.pt"))  # and cached its weights
    t.check_loss(m, data)


def test_signatures():
    a = item_signature((torch.zeros(5), torch.tensor(1)))
    b = item_signature((torch.zeros(7), torch.tensor(2)))
    merged = merge_signatures(a, b)
    assert merged["seq"][0]["tensor"] == [None]  # variable length stays open
    assert signature_mismatch(merged, item_signature((torch.zeros(3), torch.tensor(0)))) is None
    msg = signature_mismatch(a, item_signature((torch.zeros(5, dtype=torch.float64), torch.tensor(0))))
    assert "dtype" in msg
    assert "tuple of 2" in signature_mismatch(a, item_signature(torch.zeros(5)))


def test_query_signature_allows_token_sequences_of_any_length():
    """Token ids vary in length even when the sampled training items happen to agree; float
    features keep their fixed shape, and a middle item that differs makes that dim variable."""
    from grass_index.indexdir.fingerprints import data_signature
    from grass_index.task import item_signature, signature_mismatch

    tokens = [(torch.arange(5), torch.tensor(1.0)) for _ in range(10)]
    sig = data_signature(tokens)
    assert signature_mismatch(sig, item_signature((torch.arange(7), torch.tensor(0.0)))) is None
    assert "expected dtype int64" in signature_mismatch(
        sig, item_signature((torch.arange(7.0), torch.tensor(0.0))))

    images = [torch.zeros(8, 8) for _ in range(10)]
    assert "expected shape [8, 8], got [8, 9]" in signature_mismatch(
        data_signature(images), item_signature(torch.zeros(8, 9)))
    images[5] = torch.zeros(8, 9)  # not first, second or last: still seen by the sampler
    assert signature_mismatch(data_signature(images), item_signature(torch.zeros(8, 11))) is None
