""""auto" is the default damping of every entry point and is recorded as such, while an index
whose record says null (every index built before the switch) keeps meaning 0.3 × mean
eigenvalue and scores exactly as before; the spectrum behind "auto" comes from LAPACK's
two-stage reduction, equal to scipy's eigvalsh."""

import numpy as np
import pytest
import scipy
import torch
from typer.testing import CliRunner

import grass_index as gi
from grass_index.cli.main import app
from grass_index.maskfit.fit import MaskFitError, MaskFitOptions, _damping, _scores
from grass_index.pipeline.pass2 import suggested_damping
from grass_index.precondition import DEFAULT_DAMPING, Preconditioner
from grass_index.precondition.damping import LEGACY_DAMPING, auto_damping
from grass_index.precondition.eigen import eigenvalues
from tests.test_eval_run import TASK

SPECS = dict(sparsification="identity", projection="identity")


def test_fast_eigenvalues_equal_scipy():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((150, 300)) * np.geomspace(1, 1e-4, 300)  # rank 150, wide spectrum
    for a in (G.T @ G / 150, G @ G.T, np.diag([3.0, 1.0]), np.eye(1)):
        before = a.copy()
        got, want = eigenvalues(a), scipy.linalg.eigvalsh(a)
        np.testing.assert_array_equal(a, before)  # the input is left as it was
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * abs(want).max())
        assert auto_damping(got) == pytest.approx(auto_damping(want), rel=1e-9)
        np.testing.assert_array_equal(eigenvalues(a, reference=True), want)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    (d / "ridge.py").write_text(TASK)
    return gi.load_task(d / "ridge.py")


def _build(task, out, **kw):
    return gi.build_index(task.model(), task.train_data(), task.loss, out, task=task.ref,
                          progress=False, batch_size=16, **SPECS, **kw)


def _scores_of(task, idx):
    return idx.score(task.model(), task.query_data(), task.loss).numpy()


def test_default_build_records_auto_and_null_record_keeps_0_3(task, tmp_path):
    r = CliRunner().invoke(app, ["build", task.ref, "--out", str(tmp_path / "cli"),
                                 "--sparsification", "identity", "--projection", "identity",
                                 "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    cli = gi.open_index(tmp_path / "cli")
    api = _build(task, tmp_path / "api")  # no damping given: the default
    assert DEFAULT_DAMPING == "auto"
    for idx in (cli, api):
        assert idx.config["damping"] == "auto"
    assert cli.config["damping_used"] == api.config["damping_used"]
    # the λ recorded is the rule on the layer's Fisher, from the stored sketches
    (name, k), = api.layout.items()
    g = np.concatenate([rows for _, rows in api.raw_sketches()]).astype(np.float64)
    F = g.T @ g / len(g)
    assert api.config["damping_used"][name] == pytest.approx(
        auto_damping(np.linalg.eigvalsh(F)), rel=1e-6)  # F summed by float32 GEMMs
    assert api.config["damping_used"][name] != pytest.approx(LEGACY_DAMPING * np.trace(F) / k)

    # an index recorded with null (what the old code path writes for damping=None)
    old = _build(task, tmp_path / "old", damping=None)
    rel = _build(task, tmp_path / "rel", damping=LEGACY_DAMPING)
    assert old.config["damping"] is None and rel.config["damping"] == "0.3"
    assert old.config["damping_used"] == rel.config["damping_used"]  # the same bits
    assert old.config["damping_used"] != api.config["damping_used"]
    before = _scores_of(task, old)
    np.testing.assert_array_equal(before, _scores_of(task, rel))
    r = CliRunner().invoke(app, ["info", str(tmp_path / "old")])
    assert r.exit_code == 0 and "0.3 × mean eigenvalue (recorded null" in r.output
    r = CliRunner().invoke(app, ["info", str(tmp_path / "api")])
    assert r.exit_code == 0 and "auto (λ = 30 × the eigenvalue at 99.95%" in r.output

    # a refit that keeps the recorded damping (reprecondition without one; verify --repair)
    old.reprecondition(index="flat:fp16")
    assert old.config["damping"] is None
    assert old.config["damping_used"] == rel.config["damping_used"]
    old.reprecondition(index="flat:faiss")
    np.testing.assert_array_equal(_scores_of(task, old), before)
    (tmp_path / "old" / old.config["index_file"]).unlink()
    rep = gi.verify_index(tmp_path / "old", repair=True)
    assert rep["ok"] and rep["repaired"], rep
    again = gi.open_index(tmp_path / "old")
    assert again.config["damping"] is None
    np.testing.assert_array_equal(_scores_of(task, again), before)
    # switching an old index to the new default is explicit
    again.reprecondition(damping="auto")
    assert again.config["damping"] == "auto"
    assert again.config["damping_used"] == api.config["damping_used"]
    np.testing.assert_array_equal(_scores_of(task, again), _scores_of(task, api))
    api.reprecondition(hessian="eFIM")  # keeps "auto"
    assert api.config["damping"] == "auto"


def test_workers_and_merge_record_auto_and_keep_an_old_null(task, tmp_path):
    opts = gi.BuildOptions(batch_size=16, **SPECS)
    for out, index_options in ((tmp_path / "new", gi.IndexOptions()),
                               (tmp_path / "old", gi.IndexOptions(damping=None))):
        for w in ("0/2", "1/2"):
            gi.build_shard(task.model(), task.train_data(), task.loss, out, w, opts,
                           index_options, task=task.ref, progress=False)
    new = gi.merge_shards(tmp_path / "new", progress=False)
    old = gi.merge_shards(tmp_path / "old", progress=False)
    single = _build(task, tmp_path / "single")
    assert new.config["damping"] == "auto" and old.config["damping"] is None
    assert new.config["damping_used"] == pytest.approx(single.config["damping_used"],
                                                       rel=1e-6)  # shard sums
    legacy = _build(task, tmp_path / "legacy", damping=0.3)
    assert old.config["damping_used"] == pytest.approx(legacy.config["damping_used"],
                                                       rel=1e-6)  # shard sums


def test_mask_fit_defaults_to_auto_with_the_rule_on_its_own_fisher():
    assert MaskFitOptions().damping == "auto"
    assert _damping(MaskFitOptions()) == ("auto", 30.0)
    assert _damping(MaskFitOptions(damping=None)) == ("relative", LEGACY_DAMPING)
    assert _damping(MaskFitOptions(damping=0.1)) == ("relative", 0.1)
    with pytest.raises(MaskFitError, match="not an absolute one"):
        _damping(MaskFitOptions(damping="abs:1e-3"))
    with pytest.raises(MaskFitError, match="bad damping"):
        _damping(MaskFitOptions(damping="auto:x"))
    rng = np.random.default_rng(0)
    n_a, N, dim = 3, 12, 20
    g = torch.from_numpy(rng.standard_normal((n_a + N, dim)) * np.geomspace(1, 1e-3, dim))
    K = g @ g[n_a:].T  # [n_a + N, N]: K(w) at w = 1
    got = _scores(K, n_a, ("auto", 30.0), dim)
    Gf = g[n_a:].numpy()
    F = Gf.T @ Gf / N
    lam = auto_damping(np.linalg.eigvalsh(F))
    want = g[:n_a].numpy() @ np.linalg.solve(F + lam * np.eye(dim), Gf.T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9 * abs(want).max())


def test_a_refused_auto_damping_suggests_another_multiple():
    assert suggested_damping("auto", "larger") == "auto:300.0"
    assert suggested_damping("auto:30", "smaller") == "auto:3.0"
    assert suggested_damping("auto:1e6", "larger") is None
    assert suggested_damping(None, "larger") == "3.0"  # an old index's 0.3: 10× up
    assert suggested_damping(0.01, "larger") == "0.3"
    assert suggested_damping("abs:1e-9", "larger") == "0.3"


def test_preconditioner_fit_defaults_to_auto():
    G = np.random.default_rng(1).standard_normal((60, 8)) * np.geomspace(1, 1e-2, 8)
    F = G.T @ G / 60
    pre = Preconditioner.fit({"a": F}, {"a": 8})
    assert pre.describe()["damping"] == "auto"
    assert pre.damping_used["a"] == pytest.approx(auto_damping(np.linalg.eigvalsh(F)),
                                                  rel=1e-9)
    legacy = Preconditioner.fit({"a": F}, {"a": 8}, damping=None)
    assert legacy.damping_used["a"] == LEGACY_DAMPING * np.trace(F) / 8
    assert legacy.describe()["damping"] == "0.3"
