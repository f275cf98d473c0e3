"""tune: the sweep's LDS equals the LDS of scores from the re-preconditioned index; the winner
becomes the index's preconditioner, recorded in config (kept by verify --repair, dropped by
another refit); clear errors without train(); `grass-index tune --json` and `info`."""
import json

import numpy as np
import pytest

from tests.test_eval_run import TASK  # a ridge task with a deterministic train()

FACTORS = (1e-3, 0.1, 10.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import grass_index as gi

    d = tmp_path_factory.mktemp("tune")
    (d / "ridge.py").write_text(TASK)
    (d / "nolearn.py").write_text(TASK.replace("def train(", "def _train("))
    task = gi.load_task(d / "ridge.py")
    gi.build_index(task.model(), task.train_data(), task.loss, d / "idx",
                   sparsification="identity", projection="identity", hessian="eFIM",
                   damping=0.3, task=task.ref, progress=False, batch_size=16)
    return d, task


def _tune(d, **kw):
    import grass_index as gi

    kw = dict(task=str(d / "ridge.py"), num_subsets=12, seeds=[0], ground_truth=d / "gt",
              factors=FACTORS, progress=False) | kw
    return gi.open_index(d / "idx").tune(**kw)


def test_sweep_matches_rescoring(built):
    """Each grid point's LDS from subset sums equals lds() on idx.score after reprecondition."""
    import grass_index as gi
    from grass_index.eval import lds, load_ground_truth

    d, task = built
    res = _tune(d, apply=False)
    added = sum(len(e["added_low"]) + len(e["added_high"]) for e in res.extended)
    assert [c.name for c in res.grid][:2] == ["identity", "eFIM auto (spectrum rule)"]
    assert len(res.grid) == 2 + 2 * len(FACTORS) + added
    gt = load_ground_truth(d / "gt", seeds=[0])
    from grass_index.eval.tune import split_queries

    val, held = split_queries(6, 0.5, 0)
    # identity, auto, per-layer, global
    for c in (res.grid[0], res.grid[1], res.grid[2], res.grid[-1]):
        idx = gi.open_index(d / "idx")
        idx.reprecondition(hessian=c.hessian, damping=c.damping)
        s = idx.score(task.model(), task.query_data(), task.loss).numpy()
        want_val = lds(s[val], gt.subsets, gt.losses[:, val])[0]
        want_held = lds(s[held], gt.subsets, gt.losses[:, held])[0]
        assert c.val_lds == pytest.approx(want_val, abs=1e-9), c.name
        assert c.heldout_lds == pytest.approx(want_held, abs=1e-9), c.name


def test_apply_records_choice_and_info(built):
    import grass_index as gi
    from typer.testing import CliRunner

    from grass_index.cli.main import app

    d, _ = built
    res = _tune(d)
    assert res.applied and res.choice.val_lds == max(c.val_lds for c in res.grid)
    idx = gi.open_index(d / "idx")
    cfg = idx.config
    assert cfg["hessian"] == res.choice.hessian
    if res.choice.hessian == "eFIM":
        assert cfg["damping"] == res.choice.damping
    assert cfg["tune"]["choice"]["name"] == res.choice.name
    assert len(cfg["tune"]["grid"]) == len(res.grid)
    out = CliRunner().invoke(app, ["info", str(d / "idx")])
    assert out.exit_code == 0 and "tuned" in out.output and res.choice.name in out.output
    # verify --repair keeps the record; another damping drops it
    rep = gi.verify_index(d / "idx", repair=True)
    assert rep["ok"] and gi.open_index(d / "idx").config.get("tune")
    gi.open_index(d / "idx").reprecondition(hessian="eFIM", damping=0.05)
    assert "tune" not in gi.open_index(d / "idx").config


def test_cli_json_and_errors(built):
    from typer.testing import CliRunner

    from grass_index.cli.main import app

    d, _ = built
    r = CliRunner()
    res = r.invoke(app, ["tune", str(d / "idx"), "--task", str(d / "ridge.py"), "-m", "12", "--seeds", "0", "--ground-truth",
                         str(d / "gt"), "--factors", "0.001,0.1,10", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["choice"]["name"] in {c["name"] for c in doc["grid"]} and not doc["applied"]
    assert set(doc["best_by_scope"]) == {"identity", "auto", "per-layer", "global"}
    res = r.invoke(app, ["tune", str(d / "idx"), "--task", str(d / "nolearn.py"), "--json"])
    assert res.exit_code == 1 and "defines no train(" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = r.invoke(app, ["tune", str(d / "idx"), "--task", str(d / "ridge.py"), "--factors", "0,1", "-m", "12", "--seeds", "0",
                         "--ground-truth", str(d / "gt")])
    assert res.exit_code == 1 and "positive numbers" in res.output


def test_split_is_disjoint_and_seeded():
    from grass_index.eval.run import EvalError
    from grass_index.eval.tune import split_queries

    v, h = split_queries(11, 0.5, 3)
    assert len(v) + len(h) == 11 and not set(v) & set(h)
    assert np.array_equal(v, split_queries(11, 0.5, 3)[0])
    with pytest.raises(EvalError, match="strictly between"):
        split_queries(11, 1.0, 0)


def test_ekfac_candidates_match_rescoring(tmp_path):
    """A factored identity build keeps Kronecker factors: tune's grid gets EK-FAC points whose
    sweep LDS equals lds() on the index re-preconditioned with hessian ekfac; --scopes ekfac on
    an index without factors says what is missing."""
    import grass_index as gi
    from grass_index.eval import lds, load_ground_truth
    from grass_index.eval.tune import split_queries

    (tmp_path / "ridge.py").write_text(TASK)
    task = gi.load_task(tmp_path / "ridge.py")
    gi.build_index(task.model(), task.train_data(), task.loss, tmp_path / "idx",
                   sparsification="identity-8*8", projection="identity", task=task.ref,
                   progress=False, batch_size=16)
    res = _tune(tmp_path, apply=False)
    ek = [c for c in res.grid if c.hessian == "ekfac" and c.scope == "ekfac"]
    added = [f for e in res.extended if e["scope"] == "ekfac"
             for f in e["added_low"] + e["added_high"]]
    assert len(ek) == len(FACTORS) + len(added) and res.best("ekfac") in ek
    ek.append(res.best("ekfac auto"))  # the spectrum rule on EK-FAC's eigenvalues
    gt = load_ground_truth(tmp_path / "gt", seeds=[0])
    val, held = split_queries(6, 0.5, 0)
    for c in (ek[0], ek[-2], ek[-1]):
        idx = gi.open_index(tmp_path / "idx")
        idx.reprecondition(hessian=c.hessian, damping=c.damping)
        s = idx.score(task.model(), task.query_data(), task.loss).numpy()
        assert c.val_lds == pytest.approx(lds(s[val], gt.subsets, gt.losses[:, val])[0], abs=1e-6)
        assert c.heldout_lds == pytest.approx(lds(s[held], gt.subsets, gt.losses[:, held])[0],
                                              abs=1e-6)


def test_ekfac_scope_without_factors(built):
    from grass_index.errors import GrassIndexError

    d, _ = built
    with pytest.raises(GrassIndexError, match="no Kronecker factors"):
        _tune(d, apply=False, scopes=["ekfac"])


def _points(scope, factors, curve):
    from grass_index.eval.tune import candidate

    return [_scored(candidate(scope, f), curve) for f in factors]


def _scored(c, curve):
    c.val_lds = c.heldout_lds = curve(c.factor)
    return c


@pytest.mark.parametrize("peak, stopped", [(1e9, "identity limit"), (1e-12, "smallest damping"),
                                           (300.0, "interior"), (1e-5, "interior")])
def test_extend_grid_walks_to_the_peak(peak, stopped):
    """A best at the grid's edge makes the grid grow that way until the best is inside it or
    the limit (identity at the top, the smallest accepted damping at the bottom) is reached;
    a best inside the grid adds nothing."""
    from grass_index.eval.tune import candidate, extend_grid

    def curve(f):  # one peak in log-damping
        return -abs(np.log10(f) - np.log10(peak))

    pts = _points("per-layer", (1e-3, 0.1, 10.0), curve)
    added, ext = extend_grid(pts, lambda f: candidate("per-layer", f), lambda c: _scored(c, curve),
                             high=1e4, low=1e-8)
    assert ext.stopped == stopped
    factors = sorted(c.factor for c in pts + added)
    best = max(pts + added, key=lambda c: c.val_lds).factor
    assert best == min(factors, key=lambda f: abs(np.log10(f) - np.log10(peak)))
    assert 1e-8 <= factors[0] and factors[-1] <= 1e4
    if stopped == "identity limit":
        assert factors[-1] == 1e4 and ext.added_high[-1] == 1e4 and not ext.added_low
    if stopped == "smallest damping":
        assert factors[0] == 1e-8 and not ext.added_high
    if stopped == "interior":  # one point past the peak on its side, no further
        assert factors.index(best) not in (0, len(factors) - 1)
    flat = extend_grid(_points("per-layer", (1e-3, 0.1, 10.0), lambda f: min(0.0, -np.log10(f))),
                       candidate, None, high=1e4, low=1e-8)  # flat below 1 ×: no slope
    assert flat == ([], None)
    inside = extend_grid(_points("per-layer", (1e-3, 0.1, 10.0), lambda f: -abs(np.log10(f) + 1)),
                         candidate, None, high=1e4, low=1e-8)
    assert inside == ([], None)


def test_tune_extends_past_the_default_grid(built):
    """A grid whose best sits at its top edge grows until it holds the best point of a wide grid
    (the same LDS), says so in --json and on stderr, and records that choice as usual."""
    from typer.testing import CliRunner

    from grass_index.cli.main import app

    d, _ = built
    wide = _tune(d, apply=False, scopes=["per-layer"], extend=False,
                 factors=tuple(float(f"{x:.0e}") for x in np.logspace(-8, 6, 29)))
    best = wide.best("per-layer")
    narrow = [c.factor for c in wide.grid if c.scope == "per-layer"
              and best.factor / 100 <= c.factor <= best.factor / 10]
    cut = _tune(d, apply=False, scopes=["per-layer"], factors=narrow, extend=False)
    assert cut.best("per-layer").factor == narrow[-1] < best.factor, "not a top-edge best"
    assert cut.best("per-layer").val_lds < best.val_lds
    res = _tune(d, apply=False, scopes=["per-layer"], factors=narrow)
    assert res.extended and res.extended[0]["added_high"]
    assert res.best("per-layer").val_lds == pytest.approx(best.val_lds, abs=1e-9)
    assert res.choice.factor == best.factor and res.extended[0]["stopped"] == "interior"
    r = CliRunner().invoke(app, ["tune", str(d / "idx"), "--task", str(d / "ridge.py"), "-m", "12",
                                 "--seeds", "0", "--ground-truth", str(d / "gt"), "--scopes",
                                 "per-layer", "--factors", ",".join(map(str, narrow)),
                                 "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["extended"][0]["scope"] == "per-layer" and doc["extended"][0]["added_high"]
    r = CliRunner().invoke(app, ["tune", str(d / "idx"), "--task", str(d / "ridge.py"), "-m", "12",
                                 "--seeds", "0", "--ground-truth", str(d / "gt"), "--scopes",
                                 "per-layer", "--factors", ",".join(map(str, narrow)),
                                 "--dry-run", "--no-progress"])
    assert r.exit_code == 0 and "extended up to" in r.output
