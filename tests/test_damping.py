"""Damping 'auto' (λ_l from the spectrum of F_l) and where a damping sits in a layer's spectrum
(`info`'s column): the rule on hand-made spectra, the fitted inverses against a dense
eigendecomposition for every storage path (dense Cholesky, low-rank Woodbury, EK-FAC), the
placement numbers against their definitions, and the recorded config / `info` output."""
import json

import numpy as np
import pytest

from grass_index.precondition import Preconditioner, PreconditionError
from grass_index.precondition.damping import (AUTO_MULTIPLE, AUTO_TAIL, auto_damping,
                                              effective_dimension, format_damping,
                                              parse_damping, placement)


def test_auto_rule_on_hand_made_spectra():
    """λ = multiple × the eigenvalue at which the sorted spectrum reaches AUTO_TAIL of its
    trace; scale-equivariant, order-free, 0 for a zero Fisher."""
    e = np.array([1000.0, 100.0, 10.0, 1.0, 0.1, 0.0, 0.0])
    share = np.cumsum(e) / e.sum()
    floor = e[np.searchsorted(share, AUTO_TAIL)]
    assert auto_damping(e) == pytest.approx(AUTO_MULTIPLE * floor)
    assert auto_damping(e[::-1] * 7.0) == pytest.approx(7.0 * auto_damping(e))
    assert auto_damping(e, 3.0) == pytest.approx(3.0 * floor)
    assert auto_damping(np.zeros(4)) == 0.0
    flat = np.full(10, 2.0)  # every direction alike: floor = mean eigenvalue
    assert auto_damping(flat) == pytest.approx(AUTO_MULTIPLE * 2.0)


def test_parse_and_format_auto():
    assert parse_damping("auto") == ("auto", AUTO_MULTIPLE)
    assert parse_damping(" AUTO:10 ") == ("auto", 10.0)
    for text in ("auto", "auto:10.0"):
        assert format_damping(*parse_damping(text)) == text
    for bad in ("auto:0", "auto:x", "auto:-1"):
        with pytest.raises(PreconditionError, match="bad damping"):
            parse_damping(bad)


def _rows(n, k, seed=0):
    rng = np.random.default_rng(seed)
    # a few strong directions over a weak tail, as real gradients have
    scale = np.r_[np.full(3, 10.0), np.full(k - 3, 0.1)]
    return (rng.standard_normal((n, k)) * scale).astype(np.float32)


def _reference(G, lam):
    F = G.astype(np.float64).T @ G.astype(np.float64) / len(G)
    return np.linalg.inv(F + lam * np.eye(F.shape[0]))


@pytest.mark.parametrize("n", [200, 6])  # dense Cholesky (n ≥ k/2) and low-rank (n < k/2)
def test_auto_fit_matches_dense_reference(n):
    k = 24
    G = _rows(n, k)
    F = G.astype(np.float64).T @ G.astype(np.float64) / n
    pre = Preconditioner.fit_layers({"a": k}, damping="auto", n=n, rows=lambda: G,
                                    take_fisher=lambda name: F.copy())
    lam = auto_damping(np.linalg.eigvalsh(F))
    assert pre.damping_used["a"] == pytest.approx(lam, rel=1e-6)
    np.testing.assert_allclose(pre.dense("a"), _reference(G, lam), rtol=2e-4,
                               atol=2e-4 * np.abs(_reference(G, lam)).max())
    assert pre.describe()["damping"] == "auto"
    e = np.linalg.eigvalsh(F)
    p = pre.placement["a"]
    assert p["d_eff/k"] == pytest.approx(np.sum(e.clip(0) / (e.clip(0) + lam)) / k, rel=5e-3)
    assert p["lambda/top"] == pytest.approx(lam / e.max(), rel=5e-3)
    if n < k / 2:  # rank n < k/2: the median eigenvalue is 0, λ/median is undefined
        assert p["lambda/median"] is None
    else:
        assert p["lambda/median"] == pytest.approx(lam / np.median(e), rel=5e-3)


# placements are rounded to 3 significant digits: rel=5e-3
def test_placement_of_a_fixed_damping_without_eigendecomposition():
    """A relative damping's Cholesky path reports d_eff from tr((F+λI)^-1) and λ/top from
    Lanczos, both equal to their definitions; no median (it would need every eigenvalue)."""
    k, n = 80, 400
    G = _rows(n, k, seed=1)
    F = G.astype(np.float64).T @ G.astype(np.float64) / n
    pre = Preconditioner.fit({"a": F}, {"a": k}, damping=0.3)
    e, lam = np.linalg.eigvalsh(F), pre.damping_used["a"]
    p = pre.placement["a"]
    assert p["d_eff/k"] == pytest.approx(effective_dimension(e, lam) / k, rel=5e-3)
    assert p["lambda/top"] == pytest.approx(lam / e.max(), rel=5e-3)
    assert p["lambda/median"] is None
    full = placement(e, lam)
    assert full["d_eff/k"] == pytest.approx(p["d_eff/k"], rel=5e-3)
    assert placement(e, 1e12 * e.max())["d_eff/k"] < 1e-9  # near identity
    assert placement(e, 1e-12 * e.min())["d_eff/k"] == pytest.approx(1.0)  # near no damping


def test_ekfac_auto_uses_corrected_eigenvalues():
    rng = np.random.default_rng(2)
    qg = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    qa = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    lam_diag = np.abs(rng.standard_normal(20)) ** 3
    pre = Preconditioner.fit_ekfac({"a": 20}, {"a": (qg, qa)}, {"a": lam_diag}, damping="auto")
    lam = auto_damping(lam_diag)
    Q = np.kron(qg, qa)
    assert pre.damping_used["a"] == pytest.approx(lam)
    np.testing.assert_allclose(pre.dense("a"), (Q / (lam_diag + lam)) @ Q.T, rtol=1e-4,
                               atol=1e-6)
    assert pre.placement["a"] == placement(lam_diag, lam)


def test_placement_survives_the_saved_state(tmp_path):
    G = _rows(50, 12)
    pre = Preconditioner.fit_layers({"a": 12}, damping="auto", n=50, rows=lambda: G,
                                    take_fisher=lambda name: G.astype(np.float64).T
                                    @ G.astype(np.float64) / 50)
    np.savez(tmp_path / "p.npz", **pre.state_dict())
    back = Preconditioner.from_state_dict(dict(np.load(tmp_path / "p.npz")), {"a": 12})
    assert back.placement == pre.placement and back.describe() == pre.describe()


def test_build_auto_records_and_info_shows_placement(tmp_path):
    """`build --damping auto` records 'auto', λ per layer and the placement; `info` shows the
    column and `info --json` carries it; reprecondition to a relative damping replaces it."""
    import grass_index as gi
    from typer.testing import CliRunner

    from grass_index.cli.main import app
    from tests.test_eval_run import TASK

    (tmp_path / "ridge.py").write_text(TASK)
    task = gi.load_task(tmp_path / "ridge.py")
    gi.build_index(task.model(), task.train_data(), task.loss, tmp_path / "idx",
                   sparsification="identity", projection="identity", damping="auto",
                   task=task.ref, progress=False, batch_size=16)
    cfg = gi.open_index(tmp_path / "idx").config
    assert cfg["damping"] == "auto"
    placed = cfg["preconditioner"]["placement"]
    assert set(placed) == set(cfg["layout"])
    r = CliRunner().invoke(app, ["info", str(tmp_path / "idx")])
    assert r.exit_code == 0 and "spectrum" in r.output and "d_eff/k" in r.output
    assert "λ/top" in r.output and "λ/median" in r.output
    r = CliRunner().invoke(app, ["info", str(tmp_path / "idx"), "--json"])
    doc = json.loads(r.stdout)
    assert doc["config"]["preconditioner"]["placement"] == placed
    idx = gi.open_index(tmp_path / "idx")
    idx.reprecondition(damping=1e4)  # far above the spectrum: close to identity
    after = gi.open_index(tmp_path / "idx").config["preconditioner"]["placement"]
    assert all(p["d_eff/k"] < 0.01 and p["lambda/top"] > 100 for p in after.values())
