"""A model with 10+ layers of one kind: the records' JSON keys are sorted ("10" before "2"), but
the sketch concatenates layers in model order. Every reader that slices columns by a stored
layout (verify, re-precondition, self-influence, score) must use the column order."""
import shutil
import subprocess
import sys

import pytest
import torch

import grass_index as gi
from grass_index.indexdir.config import read_config
from grass_index.indexdir.record import read_build_record


def _deep_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [torch.nn.Linear(6, 6), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(6, 3)).eval()


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.fixture(scope="module")
def deep_index(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    data = [(X[i], Y[i]) for i in range(40)]
    out = tmp_path_factory.mktemp("deep") / "idx"
    model = _deep_model()
    idx = gi.build_index(model, data, _loss, out, progress=False, damping="abs:0.01")
    return model, data, out, idx


def test_records_read_back_in_column_order(deep_index):
    model, _, out, idx = deep_index
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(names) != names  # the case this file is about
    assert list(idx.record.layout) == names
    assert list(read_config(out)["layout"]) == names
    assert list(read_build_record(out)["layout"]) == names


def test_verify_finds_faiss_and_store_agree(deep_index):
    _, _, out, _ = deep_index
    r = subprocess.run([sys.executable, "-m", "grass_index", "verify", str(out)],
                       capture_output=True, text=True)
    said = r.stdout + r.stderr
    assert r.returncode == 0, said
    assert "exact scan" in said and "FAIL" not in said


def test_self_influence_is_the_diagonal_of_score(deep_index):
    model, data, _, idx = deep_index
    S = idx.score(model, data[:6], _loss)
    si = idx.self_influence()[:6]
    torch.testing.assert_close(si, torch.diagonal(S[:, :6]).to(si.dtype), rtol=1e-4,
                               atol=1e-6 * float(S.abs().max()))


def test_reprecondition_with_the_same_damping_keeps_every_score(deep_index, tmp_path):
    model, data, out, idx = deep_index
    copy = tmp_path / "idx"
    shutil.copytree(out, copy)
    before = idx.score(model, data[:6], _loss)
    again = gi.open_index(copy)
    again.reprecondition(damping="abs:0.02")
    again.reprecondition(damping="abs:0.01")
    top = again.query(model, data[:6], _loss, k=5)
    torch.testing.assert_close(again.score(model, data[:6], _loss), before, rtol=1e-4,
                               atol=1e-6 * float(before.abs().max()))
    for i, row in enumerate(top):  # FAISS (refitted) agrees with the exact scores
        for j, s in row:
            assert abs(float(before[i, j]) - s) <= 1e-4 * float(before.abs().max())
