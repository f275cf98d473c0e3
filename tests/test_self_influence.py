"""Self-influence from stored sketches: equals the diagonal of the exact score matrix of the
training set against itself, ranks correctly, and `grass-index self-influence --json`."""
import json

import numpy as np
import pytest
import torch

from tests._tiny_task import write_task


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import grass_index as gi

    d = tmp_path_factory.mktemp("selfinf")
    task = gi.load_task(write_task(d, n_train=30))
    idx = gi.build_index(task.model(), task.train_data(), task.loss, d / "idx",
                         sparsification="random_mask-4*3", projection="sjlt-8", damping=0.1,
                         task=task.ref, progress=False, batch_size=7)
    return d, task, idx


def test_equals_diagonal_of_train_scores(built):
    _, task, idx = built
    s = idx.self_influence()
    assert s.dtype == torch.float64 and s.shape == (30,)
    full = idx.score(task.model(), task.train_data(), task.loss)
    torch.testing.assert_close(s, full.diagonal().double(), rtol=1e-4, atol=1e-6)
    assert (s > 0).all()  # (F + λI)^-1 is positive definite


def test_identity_hessian_is_squared_norm(built, tmp_path):
    import grass_index as gi

    _, task, idx = built
    other = gi.open_index(idx.path)
    other.reprecondition(hessian="identity")
    raw = np.concatenate([r for _, r in other.raw_sketches()]).astype(np.float64)
    np.testing.assert_allclose(other.self_influence().numpy(), (raw ** 2).sum(1), rtol=1e-6)
    other.reprecondition(hessian="eFIM", damping=0.1)  # back, for the other tests


def test_rank_order_and_top_k():
    from grass_index.analysis import rank_self_influence
    from grass_index.attribute import AttributionError

    r = rank_self_influence(np.array([1.0, 3.0, 2.0, 3.0]), 3)
    assert r == [(1, 3.0), (3, 3.0), (2, 2.0)]
    with pytest.raises(AttributionError, match="positive integer"):
        rank_self_influence(np.ones(3), 0)


def test_cli_json_shape(built):
    from typer.testing import CliRunner

    from grass_index.cli.main import app

    d, _, idx = built
    res = CliRunner().invoke(app, ["self-influence", str(d / "idx"), "--top-k", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["results"]
    s = idx.self_influence().numpy()
    assert [r["train_id"] for r in out] == list(np.argsort(-s, kind="stable")[:5])
    assert [r["score"] for r in out] == sorted((r["score"] for r in out), reverse=True)
    assert set(out[0]) == {"train_id", "score", "label"}
    res = CliRunner().invoke(app, ["self-influence", str(d / "nope"), "--json"])
    assert res.exit_code == 1 and "not found" in res.output and "Traceback" not in res.output
