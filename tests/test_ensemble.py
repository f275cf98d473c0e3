"""Checkpoint ensembles: one index over several models of one architecture, scored by the
mean over checkpoints of each checkpoint's own influence score."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import grass_index as gi
from grass_index.store import SketchStore

from test_pipeline import PROJ, SPARS, loss_fn, make_data

N = 40
CKPTS = 3


def make_models(n: int = CKPTS):
    """n checkpoints of one architecture (the 6 -> 5 -> 3 MLP), different weights each."""
    out = []
    for s in range(n):
        torch.manual_seed(s)
        out.append(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval())
    return out


def build(models, out, spars=SPARS, proj=PROJ, loss=loss_fn, **kw):
    return gi.build_index(models, make_data(N, 1), loss, out, sparsification=spars,
                          projection=proj, batch_size=8, progress=False, **kw)


def sketches(out):
    with SketchStore.open(out / "sketches", readonly=True) as st:
        return np.concatenate([rows for _, rows in st.iter_blocks()])


SPECS = {"identity": ("identity", "identity"), "default": ("random_mask-128*128", "sjlt-4096"),
         "small": (SPARS, PROJ)}


@pytest.fixture(scope="module", params=["identity", "default"])
def pair(request, tmp_path_factory):
    """An ensemble index of 3 checkpoints, and the 3 single-model indexes of the same specs."""
    spars, proj = SPECS[request.param]
    d = tmp_path_factory.mktemp(f"ens-{request.param}")
    models = make_models()
    ens = build(models, d / "ens", spars, proj)
    singles = [build(m, d / f"single{c}", spars, proj) for c, m in enumerate(models)]
    return models, ens, singles


def test_ensemble_scores_are_the_mean_of_single_index_scores(pair):
    models, ens, singles = pair
    q = make_data(5, 2)
    got = ens.score(models, q, loss_fn).double()
    want = torch.stack([s.score(m, q, loss_fn).double() for s, m in zip(singles, models)]).mean(0)
    assert got.shape == (5, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # each checkpoint's blocks are exactly what its own index stores
    cfg = ens.config
    assert cfg["checkpoints"] == CKPTS and ens.dim == sum(s.dim for s in singles)
    assert list(ens.layout) == [f"c{c}/{k}" for c in range(CKPTS) for k in singles[0].layout]
    np.testing.assert_array_equal(sketches(ens.path),
                                  np.concatenate([sketches(s.path) for s in singles], axis=1))
    assert cfg["checkpoint_hashes"] == [s.config["model_hash"] for s in singles]
    assert cfg["model_hash"] not in cfg["checkpoint_hashes"]  # covers all of them


def test_query_and_self_influence_average_over_checkpoints(pair):
    models, ens, singles = pair
    q = make_data(4, 2)
    mean = torch.stack([s.score(m, q, loss_fn).double() for s, m in zip(singles, models)]).mean(0)
    for row, hits in zip(mean, ens.query(models, q, loss_fn, k=5)):
        assert [i for i, _ in hits] == row.argsort(descending=True)[:5].tolist()
        np.testing.assert_allclose([s for _, s in hits], row[[i for i, _ in hits]].numpy(),
                                   rtol=1e-5)
    opp = ens.query(models, q, loss_fn, k=3, opponents=True)
    assert [i for i, _ in opp[0]] == mean[0].argsort()[:3].tolist()
    si = ens.self_influence()
    want = torch.stack([s.self_influence() for s in singles]).mean(0)
    torch.testing.assert_close(si, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_cosine_is_the_cosine_of_the_concatenated_vectors(pair):
    """cosine for an ensemble: the influence score (mean over checkpoints) divided by the norms
    of the query's and the training example's vectors over every checkpoint's layers."""
    models, ens, singles = pair
    q = make_data(3, 2)
    qs = np.concatenate([s.query_sketches(m, q, loss_fn).numpy()
                         for s, m in zip(singles, models)], axis=1).astype(np.float64)
    vs = np.concatenate([np.concatenate([v for _, v in s.train_vectors()])
                         for s in singles], axis=1).astype(np.float64)
    want = (qs @ vs.T) / np.linalg.norm(qs, axis=1)[:, None] / np.linalg.norm(vs, axis=1)
    got = ens.score(models, q, loss_fn, normalize="cosine").double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    top = ens.query(models, q, loss_fn, k=3, normalize="cosine")
    assert [i for i, _ in top[0]] == np.argsort(-want[0])[:3].tolist()


def test_query_with_the_wrong_models_is_refused(pair):
    models, ens, singles = pair
    q = make_data(2, 2)
    with pytest.raises(gi.AttributionError, match="built from 3 checkpoint.*2 model.*checkpoints"):
        ens.score(models[:2], q, loss_fn)
    with pytest.raises(gi.AttributionError, match="built from 3 checkpoint.*1 model"):
        ens.score(models[0], q, loss_fn)
    with pytest.raises(gi.AttributionError, match="built from 1 checkpoint.*3 model"):
        singles[0].score(models, q, loss_fn)
    wide = [models[0], models[1], nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))]
    with pytest.raises(gi.AttributionError, match="checkpoint 2: layer '0' of the model"):
        ens.score(wide, q, loss_fn)


def test_checkpoints_of_different_architectures_are_refused_in_one_line(tmp_path):
    models = make_models(2) + [nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))]
    with pytest.raises(gi.AttributionError) as e:
        build(models, tmp_path / "x")
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint 2's layer '0'" in msg and "same architecture" in msg
    other = make_models(1) + [nn.Sequential(nn.Linear(6, 3))]
    with pytest.raises(gi.AttributionError, match="checkpoint 1 has other layers"):
        build(other, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written


def test_resume_after_a_failure_mid_batch_is_bit_identical(tmp_path):
    """The loss fails on checkpoint 1 of batch 3 (checkpoint 0 already sketched it): that
    block is never committed, and a re-run resumes there to the same sketches."""
    models = make_models()
    ref = build(models, tmp_path / "ref")
    x24, bad = make_data(N, 1)[24][0], models[1]

    def flaky(model, batch):
        if model is bad and torch.is_grad_enabled() and torch.equal(batch[0][0], x24):
            raise RuntimeError("injected failure")
        return loss_fn(model, batch)

    out = tmp_path / "run"
    with pytest.raises(gi.task.TaskError, match="training examples 24..31.*injected"):
        build(models, out, loss=flaky)
    with SketchStore.open(out / "sketches", readonly=True) as st:
        assert st.committed_blocks == 3
    idx = build(models, out)
    np.testing.assert_array_equal(sketches(out), sketches(ref.path))
    q = make_data(5, 2)
    assert torch.equal(idx.score(models, q, loss_fn), ref.score(models, q, loss_fn))


def test_resume_with_one_checkpoint_changed_is_refused(tmp_path):
    models = make_models()
    out = tmp_path / "run"
    build(models, out)
    changed = make_models()
    with torch.no_grad():
        changed[2][0].weight[0, 0] += 1e-3  # only the last checkpoint differs, slightly
    with pytest.raises(gi.AttributionError, match="model_hash.*weights differ"):
        build(changed, out)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import grass_index as gi
    from test_ensemble import build, make_models
    from test_pipeline import loss_fn

    def slow_loss(model, batch):
        time.sleep(0.02)
        return loss_fn(model, batch)

    def progress(stage, done, total):
        print(stage, done, flush=True)

    gi.build_index(make_models(), __import__("test_pipeline").make_data({n}, 1), slow_loss,
                   sys.argv[1], sparsification={spars!r}, projection={proj!r}, batch_size=8,
                   progress=progress)
""")


def test_kill_9_in_pass_1_then_resume_is_bit_identical(tmp_path):
    ref = build(make_models(), tmp_path / "ref")
    script = tmp_path / "build.py"
    script.write_text(KILL_SCRIPT.format(tests=os.path.dirname(__file__), n=N, spars=SPARS,
                                         proj=PROJ))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(gi.__file__)), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stdout:
            st, _, d = line.partition(" ")
            if st == "sketch" and int(d) >= 2:
                os.kill(p.pid, signal.SIGKILL)
                break
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read()
    with SketchStore.open(out / "sketches", readonly=True) as st:
        assert 2 <= st.committed_blocks < 5
    idx = build(make_models(), out)
    np.testing.assert_array_equal(sketches(out), sketches(ref.path))
    q = make_data(5, 2)
    assert torch.equal(idx.score(make_models(), q, loss_fn), ref.score(make_models(), q, loss_fn))


def test_worker_shards_and_merge_equal_a_single_process_build(tmp_path):
    models = make_models()
    ref = build(models, tmp_path / "ref")
    out = tmp_path / "sharded"
    for w in range(2):
        gi.build_shard(models, make_data(N, 1), loss_fn, out, (w, 2),
                       gi.BuildOptions(sparsification=SPARS, projection=PROJ, batch_size=8),
                       progress=False)
    idx = gi.merge_shards(out, progress=False)
    np.testing.assert_array_equal(sketches(out), sketches(ref.path))
    q = make_data(3, 2)
    torch.testing.assert_close(idx.score(models, q, loss_fn), ref.score(models, q, loss_fn))


def test_a_list_of_one_model_is_a_single_model_index(tmp_path):
    m = make_models(1)
    idx = build(m, tmp_path / "one")
    assert "checkpoints" not in idx.config and list(idx.layout) == ["0", "2"]
    assert idx.config["model_hash"] == build(m[0], tmp_path / "plain").config["model_hash"]


def test_plan_scales_with_the_number_of_checkpoints():
    from grass_index import plan
    from grass_index.plan import plan_for

    one = plan_for(make_models(1)[0], 1000, sparsification=SPARS, projection=PROJ)
    three = plan_for(make_models(), 1000, sparsification=SPARS, projection=PROJ)
    assert three.K == 3 * one.K
    fixed = plan.DIR_BYTES  # an empty store's pages, config.json: once per build
    for p in (one, three):  # the rows, in whole LMDB pages per block (not linear at tiny K)
        assert 4 * 1000 * p.K <= p.store_disk - fixed <= 4 * 1000 * p.K + 32 * 4096 * 1.02
    assert three.store_disk > 1.9 * one.store_disk - fixed
    assert three.precond_disk == pytest.approx(3 * one.precond_disk)


# ----------------------------------------------------------------------------- task + CLI

ENSEMBLE_TASK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from torch import nn

    def checkpoints():
        out = []
        for s in range({n_ckpt}):
            torch.manual_seed(s)
            out.append(nn.Sequential(nn.Linear(6, {hidden}), nn.Tanh(), nn.Linear({hidden}, 3)))
        {extra}
        return out

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g)
        return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=g))

    def train_data():
        return _data(40, 1)

    def query_data():
        return _data(6, 2)

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")
""")


def write_ensemble_task(d, name="ens_task.py", n_ckpt=CKPTS, extra=""):
    p = d / name
    p.write_text(ENSEMBLE_TASK.format(n_ckpt=n_ckpt, hidden=5, extra=extra))
    return p


def test_task_checkpoints_take_precedence_over_model(tmp_path):
    t = gi.load_task(write_ensemble_task(tmp_path))
    m = t.index_model()
    assert len(m) == CKPTS and all(not x.training for x in m)
    assert isinstance(t.model(), nn.Module)  # no model(): the first checkpoint
    bad = gi.load_task(write_ensemble_task(tmp_path, "bad.py", extra="out = out[0]"))
    with pytest.raises(gi.task.TaskError, match="checkpoints\\(\\) returned Sequential.*list"):
        bad.index_model()


def test_cli_build_info_query_score_self_influence(tmp_path):
    runner = CliRunner()
    from grass_index.cli.main import app

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    task = write_ensemble_task(tmp_path)
    out = tmp_path / "idx"
    small = ["--sparsification", SPARS, "--projection", PROJ, "--batch-size", "8"]
    plan = invoke("plan", task, "--sparsification", SPARS, "--projection", PROJ, "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["plans"][PROJ]["K"] == CKPTS * 16
    assert "3 checkpoints" in invoke("plan", task, *small).output
    res = invoke("build", task, "--out", out, *small)
    assert res.exit_code == 0, res.output
    assert "3 checkpoints" in " ".join(res.output.split())
    info = invoke("info", out)
    assert info.exit_code == 0 and "checkpoints" in info.output, info.output
    cfg = json.loads(invoke("info", out, "--json").stdout)["config"]
    assert cfg["checkpoints"] == CKPTS
    q = invoke("query", out, "--task", task, "--example", 1, "--top-k", 4, "--json")
    assert q.exit_code == 0, q.output
    hits = json.loads(q.stdout)["results"][0]["proponents"]
    s = invoke("score", out, "--task", task, "--out", tmp_path / "s.npy")
    assert s.exit_code == 0, s.output
    row = np.load(tmp_path / "s.npy")[1]
    assert [h["train_id"] for h in hits] == np.argsort(-row)[:4].tolist()
    si = invoke("self-influence", out, "--task", task, "--top-k", 3, "--json")
    assert si.exit_code == 0, si.output
    assert len(json.loads(si.stdout)["results"]) == 3
    # an ensemble task whose checkpoints differ in architecture: one clear line
    bad = tmp_path / "bad.py"
    bad.write_text(ENSEMBLE_TASK.format(
        n_ckpt=2, hidden=5,
        extra="out.append(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)))"))
    res = invoke("build", bad, "--out", tmp_path / "bad", *small)
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "same architecture" in " ".join(res.output.split())


@pytest.mark.slow  # two torchrun ranks start torch and grass_index (about a minute under load)
def test_torchrun_two_ranks_build_the_same_ensemble_index(tmp_path):
    import socket
    from pathlib import Path

    task = write_ensemble_task(tmp_path)
    small = ["--sparsification", SPARS, "--projection", PROJ, "--batch-size", "8"]
    ref = tmp_path / "ref"
    res = CliRunner().invoke(__import__("grass_index.cli.main", fromlist=["app"]).app,
                             ["build", str(task), "--out", str(ref), *small])
    assert res.exit_code == 0, res.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(gi.__file__).resolve().parent.parent
    out = tmp_path / "ranks"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                          "grass_index", "build", str(task), "--out", str(out), *small],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    np.testing.assert_array_equal(sketches(out), sketches(ref))
    t = gi.load_task(task)
    q = t.query_data()
    a, b = gi.open_index(out), gi.open_index(ref)
    assert a.config["checkpoints"] == CKPTS
    want = b.score(t.index_model(), q, t.loss)  # atol: float32 Fisher-sum rounding (as in
    torch.testing.assert_close(a.score(t.index_model(), q, t.loss),  # test_distributed)
                               want, rtol=1e-5, atol=2e-6 * float(want.abs().max()))


def test_serve_answers_from_the_ensemble(tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra (FastAPI, uvicorn) is not installed")
    from fastapi.testclient import TestClient

    from grass_index.serve import create_app

    task = write_ensemble_task(tmp_path)
    t = gi.load_task(task)
    out = tmp_path / "idx"
    idx = gi.build_index(t.index_model(), t.train_data(), t.loss, out, sparsification=SPARS,
                         projection=PROJ, batch_size=8, task=t.ref, progress=False)
    want = idx.query(t.index_model(), [t.query_data()[2]], t.loss, k=4)[0]
    with TestClient(create_app(out, task=str(task)), raise_server_exceptions=False) as c:
        r = c.get("/api/query", params=dict(example=2, k=4))
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]["proponents"]
    assert [h["train_id"] for h in got] == [i for i, _ in want]
    np.testing.assert_allclose([h["score"] for h in got], [s for _, s in want], rtol=1e-5)


def test_eval_and_tune_work_on_an_ensemble(tmp_path):
    """tune's sweep (subset sums of the stored raw sketches, per-block eigenbases) predicts the
    LDS of the ensemble's own scores after reprecondition; eval scores with every checkpoint."""
    from grass_index.eval import lds, load_ground_truth, run_eval
    from grass_index.eval.tune import split_queries
    from test_eval_run import TASK

    src = TASK + textwrap.dedent('''
        def checkpoints():
            a, b = model(), model()
            with torch.no_grad():
                b.weight.mul_(0.5)  # a second, different checkpoint of the same architecture
            return [a, b]
    ''')
    (tmp_path / "ridge_ens.py").write_text(src)
    task = gi.load_task(tmp_path / "ridge_ens.py")
    out = tmp_path / "idx"
    gi.build_index(task.index_model(), task.train_data(), task.loss, out,
                   sparsification="identity", projection="identity", task=task.ref,
                   progress=False, batch_size=16)
    idx = gi.open_index(out)
    assert idx.config["checkpoints"] == 2
    res = idx.tune(task=str(tmp_path / "ridge_ens.py"), num_subsets=12, seeds=[0],
                   ground_truth=tmp_path / "gt", factors=(1e-3, 10.0), progress=False,
                   apply=False)
    gt = load_ground_truth(tmp_path / "gt", seeds=[0])
    val, _ = split_queries(6, 0.5, 0)
    for c in res.grid:
        again = gi.open_index(out)
        again.reprecondition(hessian=c.hessian, damping=c.damping)
        s = again.score(task.index_model(), task.query_data(), task.loss).numpy()
        assert c.val_lds == pytest.approx(lds(s[val], gt.subsets, gt.losses[:, val])[0],
                                          abs=1e-9), c.name
    ev = run_eval(out, task=task, num_subsets=12, seeds=[0], ground_truth=tmp_path / "gt",
                  progress=False)
    s = gi.open_index(out).score(task.index_model(), task.query_data(), task.loss).numpy()
    assert ev.lds == pytest.approx(lds(s, gt.subsets, gt.losses)[0], abs=1e-9)


def test_verify_repair_recomputes_a_damaged_block_with_every_checkpoint(tmp_path):
    from test_adversarial import _damage_block

    from grass_index.pipeline.repair import _recompute_blocks

    task = write_ensemble_task(tmp_path)
    t = gi.load_task(task)
    out = tmp_path / "idx"
    gi.build_index(t.index_model(), t.train_data(), t.loss, out, sparsification=SPARS,
                   projection=PROJ, batch_size=8, task=t.ref, progress=False)
    before = sketches(out)
    _damage_block(out, 2)
    assert not gi.verify_index(out)["ok"]
    other = tmp_path / "other.py"  # checkpoint 2 differs: refused by the model fingerprint
    other.write_text(ENSEMBLE_TASK.format(n_ckpt=CKPTS, hidden=5,
                                          extra="torch.nn.init.zeros_(out[2][0].bias)"))
    with pytest.raises(gi.AttributionError, match="model fingerprint"):
        _recompute_blocks(out, gi.open_index(out).config, [2], gi.load_task(other))
    rep = gi.verify_index(out, repair=True, task=t)
    assert any("recomputed sketch blocks [2]" in r for r in rep["repaired"]), rep
    np.testing.assert_array_equal(sketches(out), before)


def test_ekfac_on_an_ensemble_is_refused_and_the_capture_check_covers_every_checkpoint(tmp_path):
    with pytest.raises(gi.AttributionError) as e:
        build(make_models(2), tmp_path / "x", "random_mask-4*3", "identity", hessian="ekfac")
    assert "\n" not in str(e.value) and "ensemble" in str(e.value) and "eFIM" in str(e.value)
    assert not (tmp_path / "x").exists()
    rep = gi.check_capture(make_models(2), make_data(N, 1), loss_fn,
                           gi.BuildOptions(sparsification=SPARS, projection=PROJ, batch_size=8))
    assert rep.ok
    assert [r["layer"] for r in rep.layers] == ["c0/0", "c0/2", "c1/0", "c1/2"]
