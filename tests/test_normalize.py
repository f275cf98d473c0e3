"""Cosine score mode: exact against a dense reference, search equals sorting the exact cosine
scores, the cosine index follows the preconditioner, and the CLI's --normalize."""
import json

import numpy as np
import pytest
import torch

from tests._tiny_task import write_task


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import grass_index as gi

    d = tmp_path_factory.mktemp("cosine")
    task = gi.load_task(write_task(d, n_train=30))
    gi.build_index(task.model(), task.train_data(), task.loss, d / "idx",
                   sparsification="random_mask-4*3", projection="sjlt-8", damping=0.1,
                   task=task.ref, progress=False, batch_size=7)
    return d, task


def test_cosine_scores_match_dense_reference(built):
    import grass_index as gi

    d, task = built
    idx = gi.open_index(d / "idx")
    q = idx.query_sketches(task.model(), task.query_data(), task.loss).double()
    vec = torch.from_numpy(np.concatenate([v for _, v in idx.train_vectors()])).double()
    want = (q / q.norm(dim=1, keepdim=True)) @ (vec / vec.norm(dim=1, keepdim=True)).T
    got = idx.score(task.model(), task.query_data(), task.loss, normalize="cosine")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.abs().max() <= 1 + 1e-5
    # the default mode is unchanged
    torch.testing.assert_close(idx.score(task.model(), task.query_data(), task.loss),
                               idx.score_sketches(q.float()))


def test_search_is_exact_for_cosine(built):
    import grass_index as gi

    d, task = built
    idx = gi.open_index(d / "idx")
    q = idx.query_sketches(task.model(), task.query_data(), task.loss)
    exact = idx.score_sketches(q, normalize="cosine").numpy()
    for opp in (False, True):
        res = idx.search(q, 5, opponents=opp, normalize="cosine")
        for r, row in enumerate(res):
            order = np.argsort(exact[r] if opp else -exact[r], kind="stable")[:5]
            assert [i for i, _ in row] == order.tolist()
            np.testing.assert_allclose([s for _, s in row], exact[r][order], rtol=1e-5, atol=1e-6)
    assert (d / "idx" / f"index-{idx.config['preconditioner_key']}-cosine.faiss").is_file()


def test_cosine_index_follows_reprecondition(built):
    import grass_index as gi

    d, task = built
    idx = gi.open_index(d / "idx")
    q = idx.query_sketches(task.model(), task.query_data(), task.loss)
    idx.search(q, 3, normalize="cosine")
    old = idx.config["preconditioner_key"]
    idx.reprecondition(damping=3.0)
    assert not list((d / "idx").glob(f"index-{old}-cosine.faiss"))  # the refit removed it
    exact = idx.score_sketches(q, normalize="cosine").numpy()
    top = idx.search(q, 1, normalize="cosine")
    assert [r[0][0] for r in top] == exact.argmax(1).tolist()
    assert gi.verify_index(d / "idx")["ok"]
    idx.reprecondition(damping=0.1)


def test_bad_mode_and_cli(built):
    import grass_index as gi
    from typer.testing import CliRunner

    from grass_index.attribute import AttributionError
    from grass_index.cli.main import app

    d, task = built
    idx = gi.open_index(d / "idx")
    with pytest.raises(AttributionError, match="'none'.*'cosine'"):
        idx.search(torch.zeros(1, idx.dim), 3, normalize="l2")
    r = CliRunner()
    named = ["--task", task.ref]  # the task the index was built from (never run unasked)
    res = r.invoke(app, ["query", str(d / "idx"), *named, "--example", "0", "--normalize",
                         "cosine", "--json", "-k", "4"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["normalize"] == "cosine"
    assert all(abs(p["score"]) <= 1 + 1e-5 for p in doc["results"][0]["proponents"])
    res = r.invoke(app, ["query", str(d / "idx"), *named, "--normalize", "l2"])
    assert res.exit_code == 1 and "unknown normalize mode" in res.output
    out = d / "cos.npy"
    res = r.invoke(app, ["score", str(d / "idx"), *named, "--out", str(out), "--normalize",
                         "cosine"])
    assert res.exit_code == 0, res.output
    s = np.load(out)
    want = idx.score(task.model(), task.query_data(), task.loss, normalize="cosine").numpy()
    np.testing.assert_allclose(s, want, rtol=1e-6)
