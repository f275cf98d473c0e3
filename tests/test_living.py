"""A living index (grass_index/living/): removing examples and growing the training data
without a rebuild, each change a new generation — equal to a fresh build to float rounding,
crash-safe (kill -9 leaves the old or the new generation, bit for bit), picked up by open
readers and a running server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import grass_index as gi
from grass_index.indexdir import IndexRecord
from grass_index.store import SketchStore

from test_pipeline import PROJ, SPARS, loss_fn, make_data, make_model

KW = dict(sparsification=SPARS, projection=PROJ, batch_size=8, progress=False)
DATA = make_data(60, 1)
QUERIES = make_data(5, 2)


def first(n):
    return torch.utils.data.Subset(DATA, range(n))


def build(out, n=60, data=None, **kw):
    return gi.build_index(make_model(), data if data is not None else first(n), loss_fn, out,
                          **{**KW, **kw})


def scores(idx):
    return idx.score(make_model(), QUERIES, loss_fn)


def rows(out):
    with SketchStore.open(Path(out) / "sketches", readonly=True) as st:
        return np.concatenate([r for _, r in st.iter_blocks()])


def same(a, b, tol=1e-5):
    return float((a - b).abs().max() / b.abs().max()) < tol


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh") / "ix"
    idx = build(out)
    return idx, scores(idx)


# ----------------------------------------------------------------------------- grow

@pytest.mark.parametrize("n_old", [44, 40])  # a short last batch that the new rows fill; full
def test_build_over_grown_data_sketches_only_the_new_and_equals_a_fresh_build(tmp_path, fresh,
                                                                             n_old):
    out = tmp_path / "ix"
    build(out, n_old)
    old_rows = rows(out)
    seen = []
    idx = gi.build_index(make_model(), DATA, loss_fn, out, **{
        **KW, "progress": lambda stage, done, total: seen.append((stage, done, total))})
    assert idx.generation == 1 and idx.n_train == 60
    assert idx.settings.generation.added == (n_old, 60 - n_old)
    sketched = [d for s, d, _ in seen if s == "sketch"]
    assert sketched[0] == -(-n_old // 8) and sketched[-1] == 8  # old batches not sketched again
    new_rows = rows(out)
    assert np.array_equal(new_rows[:n_old], old_rows)  # the old rows, bit for bit
    np.testing.assert_allclose(new_rows, rows(fresh[0].path), rtol=1e-5, atol=1e-6)
    assert same(scores(idx), fresh[1])
    assert [r for r in idx.query(make_model(), QUERIES, loss_fn, k=5)] == [
        r for r in fresh[0].query(make_model(), QUERIES, loss_fn, k=5)] or all(
        same(torch.tensor([s for _, s in a]), torch.tensor([s for _, s in b]))
        for a, b in zip(idx.query(make_model(), QUERIES, loss_fn, k=5),
                        fresh[0].query(make_model(), QUERIES, loss_fn, k=5)))
    assert gi.verify_index(out)["ok"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["generation"] == {"number": 1, "added": [n_old, 60 - n_old], "removed": []}
    assert json.loads((out / "build.json").read_text())["n_train"] == 60


def test_grow_in_the_low_rank_form_and_with_auto_damping(tmp_path):
    """n < k: the layers keep an n×n core over the stored rows, which must grow with them;
    a recorded damping rule ("auto") is evaluated on the new spectrum, not kept as a number."""
    kw = dict(projection="sjlt-64", sparsification="identity", damping="auto")
    a, b = tmp_path / "a", tmp_path / "b"
    build(a, 10, **kw)
    grown = gi.add_examples(a, make_model(), first(20), loss_fn, progress=False)
    ref = build(b, 20, **kw)
    assert grown.record.damping == "auto"
    assert grown.record.damping_used == pytest.approx(ref.record.damping_used, rel=1e-5)
    assert same(scores(grown), scores(ref))
    fewer = grown.remove([2])  # the core is refitted on the 19 rows that count
    keep = [i for i in range(20) if i != 2]
    ref = build(tmp_path / "c", data=torch.utils.data.Subset(DATA, keep), **kw)
    assert same(scores(fewer)[:, keep], scores(ref))
    for got, want in zip(gi.open_index(a).query(make_model(), QUERIES, loss_fn, k=5),
                         ref.query(make_model(), QUERIES, loss_fn, k=5)):  # streamed rows
        assert [keep[i] for i, _ in want] == [i for i, _ in got]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-4)
    assert gi.verify_index(a)["ok"]


def test_add_refuses_changed_or_shrunk_data_and_other_settings(tmp_path):
    out = tmp_path / "ix"
    build(out, 40)
    changed = torch.utils.data.TensorDataset(DATA.tensors[0].clone(), DATA.tensors[1].clone())
    changed.tensors[0][3] += 1
    with pytest.raises(gi.AttributionError, match="training example 3 differs"):
        gi.add_examples(out, make_model(), changed, loss_fn, progress=False)
    with pytest.raises(gi.AttributionError, match="nothing to add"):
        gi.add_examples(out, make_model(), first(40), loss_fn, progress=False)
    other = make_model()
    with torch.no_grad():
        other[0].weight += 1
    with pytest.raises(gi.AttributionError, match="built differently.*model_hash"):
        gi.add_examples(out, other, DATA, loss_fn, progress=False)
    assert gi.open_index(out).generation == 0 and gi.verify_index(out)["ok"]


# ----------------------------------------------------------------------------- remove

def test_remove_equals_a_fresh_build_without_them_and_they_are_never_returned(tmp_path):
    out, gone = tmp_path / "ix", [3, 17, 50]
    idx = build(out).remove(gone)
    keep = [i for i in range(60) if i not in gone]
    ref = build(tmp_path / "ref", data=torch.utils.data.Subset(DATA, keep))
    s = scores(idx)
    assert same(s[:, keep], scores(ref)) and (s[:, gone] == 0).all()
    assert idx.removed == tuple(gone) and idx.generation == 1 and idx.record.n_live == 57
    for opp in (False, True):
        for norm in (None, "cosine"):
            got = idx.query(make_model(), QUERIES, loss_fn, k=60, opponents=opp, normalize=norm)
            assert all(sorted(i for i, _ in r) == keep for r in got)
    si = idx.self_influence().numpy()
    assert np.isnan(si[gone]).all() and not np.isnan(si[keep]).any()
    from grass_index.analysis import rank_self_influence
    assert sorted(i for i, _ in rank_self_influence(si)) == keep
    np.testing.assert_allclose(si[keep], ref.self_influence().numpy(), rtol=1e-4)
    assert gi.verify_index(out)["ok"]
    again = idx.remove([4])  # removals accumulate
    assert again.removed == (3, 4, 17, 50) and again.generation == 2
    assert gi.verify_index(out)["ok"]


def test_a_build_rerun_over_a_living_index_keeps_its_generation(tmp_path):
    """build over the same (grown) data: no change, or only pass 2's options; the removed
    stay removed; the Fisher cache is the generation's own."""
    out = tmp_path / "ix"
    build(out, 44)
    idx = gi.add_examples(out, make_model(), DATA, loss_fn, progress=False).remove([9])
    with SketchStore.open(out / "sketches", readonly=True) as st:
        assert st.get_meta("fisher_generation") == idx.settings.generation.tag
        assert st.get_meta("fisher_n") == 59
    again = build(out, data=DATA)
    assert again.generation == 2 and again.removed == (9,)
    refit = build(out, data=DATA, damping=0.3)
    assert refit.generation == 2 and refit.removed == (9,) and refit.record.damping == "0.3"
    keep = [i for i in range(60) if i != 9]
    ref = build(tmp_path / "ref", data=torch.utils.data.Subset(DATA, keep), damping=0.3)
    assert same(scores(refit)[:, keep], scores(ref))
    assert gi.verify_index(out)["ok"]


def test_remove_then_grow_keeps_the_removed_out(tmp_path):
    out = tmp_path / "ix"
    build(out, 44).remove([5])
    idx = gi.add_examples(out, make_model(), DATA, loss_fn, progress=False)
    assert idx.removed == (5,) and idx.settings.generation.added == (44, 0, 16)
    keep = [i for i in range(60) if i != 5]
    ref = build(tmp_path / "ref", data=torch.utils.data.Subset(DATA, keep))
    assert same(scores(idx)[:, keep], scores(ref))
    assert gi.verify_index(out)["ok"]


@pytest.mark.parametrize("ids, needle", [
    ([60], r"out of range.*0\.\.59"), ([-1], "out of range"), ([], "no ids"),
    ([2, 2], "more than once"), (["3"], "must be integers"), ([i for i in range(60) if i != 7], "no training"),
    ("3,4", "list of training ids")])
def test_remove_refuses_bad_ids_clearly(tmp_path_factory, ids, needle):
    out = tmp_path_factory.getbasetemp() / "bad-ids"
    if not out.exists():
        build(out).remove([7])
    with pytest.raises(gi.AttributionError, match=needle):
        gi.remove_examples(out, ids)
    with pytest.raises(gi.AttributionError, match="already removed"):
        gi.remove_examples(out, [7, 8])
    assert gi.open_index(out).generation == 1


def test_a_forged_generation_record_is_refused(fresh):
    cfg = dict(fresh[0].config)
    for bad, needle in ((dict(number=1, added=[50, 5], removed=[]), "sums to 55"),
                        (dict(number=1, added=[60, 0], removed=[9, 3]), "sorted"),
                        (dict(number=0, added=[60], removed=[60]), "outside"),
                        (dict(number=2, added=[60, 0], removed=[]), "generations added")):
        with pytest.raises(gi.AttributionError, match=f"field 'generation'.*{needle}"):
            IndexRecord({**cfg, "generation": bad})


# ----------------------------------------------------------------------------- readers

def test_an_open_reader_keeps_its_snapshot_then_picks_up_the_new_generation(tmp_path):
    out = tmp_path / "ix"
    build(out)
    reader = gi.open_index(out)
    before = reader.query(make_model(), QUERIES, loss_fn, k=60)
    gi.remove_examples(out, [0, 1])  # another handle (or process) commits generation 1
    assert reader.query(make_model(), QUERIES, loss_fn, k=60) == before  # its snapshot
    assert reader.refresh() and reader.generation == 1 and not reader.refresh()
    after = reader.query(make_model(), QUERIES, loss_fn, k=60)
    assert all(0 not in {i for i, _ in r} and 1 not in {i for i, _ in r} for r in after)
    stale = gi.open_index(out)
    gi.remove_examples(out, [2])  # the files a stale handle names are gone: it re-reads
    assert all(2 not in {i for i, _ in r} for r in stale.query(make_model(), QUERIES, loss_fn,
                                                                 k=60))


GROWING_TASK = textwrap.dedent("""
    import os, torch, torch.nn.functional as F
    from torch import nn

    def n():  # read on each call: the data grows while a server runs
        return int(open(os.path.join(os.path.dirname(__file__), "n.txt")).read())

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(100, 6, generator=g), torch.randint(0, 3, (100,), generator=g)
        return torch.utils.data.TensorDataset(x[:n], y[:n])

    def train_data():
        return _data(n(), 1)

    def query_data():
        return _data(6, 2)

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")
""")


def growing_task(d: Path, n: int) -> Path:
    (d / "n.txt").write_text(str(n))
    task = d / "task.py"
    task.write_text(GROWING_TASK)
    return task


def test_a_running_server_serves_the_newest_generation(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from grass_index.serve import create_app

    task = growing_task(tmp_path, 44)
    t = gi.load_task(task)
    out = tmp_path / "ix"
    gi.build_index(t.model(), t.train_data(), t.loss, out, task=t.ref, **KW)
    with TestClient(create_app(out, task=str(task)), raise_server_exceptions=False) as c:
        first_ids = {r["train_id"] for r in c.get("/api/query", params=dict(
            example=1, k=100)).json()["results"][0]["proponents"]}
        assert max(first_ids) < 44
        growing_task(tmp_path, 60)
        t2 = gi.load_task(task)
        gi.add_examples(out, t2.model(), t2.train_data(), t2.loss, progress=False, task=t2.ref)
        gi.remove_examples(out, [0])
        doc = c.get("/api/query", params=dict(example=1, k=100)).json()
        ids = {r["train_id"] for r in doc["results"][0]["proponents"]}
        assert 0 not in ids and max(ids) >= 44
        si = c.get("/api/self-influence", params=dict(limit=100)).json()
        assert si["total"] == 59 and 0 not in {r["train_id"] for r in si["results"]}


# ----------------------------------------------------------------------------- IVF

def test_ivf_keeps_its_quantizer_warns_on_drift_and_retrains_on_request(tmp_path, caplog):
    from grass_index.index import VectorIndex

    big = make_data(400, 3)
    x = big.tensors[0].clone()
    x[300:] *= 25  # the new examples sit far from the first generation's data
    data = torch.utils.data.TensorDataset(x, big.tensors[1])
    out = tmp_path / "ix"
    gi.build_index(make_model(), torch.utils.data.Subset(data, range(300)), loss_fn, out,
                   index="ivf", nlist=8, **KW)

    def centroids():
        name = json.loads((out / "config.json").read_text())["index_file"]
        v = VectorIndex.load(out / name)
        import faiss
        return faiss.downcast_index(v._index.quantizer).reconstruct_n(0, v.nlist)
    c0 = centroids()
    with caplog.at_level("WARNING", logger="grass_index"):
        gi.add_examples(out, make_model(), torch.utils.data.Subset(data, range(350)), loss_fn,
                        progress=False)
    assert np.array_equal(centroids(), c0)  # the quantizer kept
    assert "farther from the IVF index's centroids" in caplog.text
    gi.add_examples(out, make_model(), data, loss_fn, progress=False, retrain=True)
    assert not np.array_equal(centroids(), c0)
    assert gi.verify_index(out)["ok"]


# ----------------------------------------------------------------------------- CLI

def test_cli_add_remove_info(tmp_path):
    task = growing_task(tmp_path, 44)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(gi.__file__).parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "grass_index", *map(str, args)],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
    r = cli("build", task, "--out", "ix", "--projection", PROJ, "--sparsification", SPARS,
            "--batch-size", 8)
    assert r.returncode == 0, r.stderr
    growing_task(tmp_path, 60)
    r = cli("add", "ix", "--task", task)
    assert r.returncode == 0 and "sketching only the 16 new" in r.stderr, r.stderr
    assert "generation 1" in r.stdout
    (tmp_path / "ids.txt").write_text("3\n17  # mislabelled\n50,51\n")
    assert cli("remove", "ix", "--ids-file", "ids.txt").returncode == 0
    r = cli("remove", "ix", "--ids", "3,x")
    assert r.returncode == 1 and "'x' is not a training id" in r.stderr
    r = cli("remove", "ix", "--ids", "3")
    assert r.returncode == 1 and "already removed" in r.stderr
    r = cli("info", "ix")
    assert "rows added per generation: 44, 16, 0" in r.stdout and "4 ids (3, 17, 50, 51)" in r.stdout
    assert cli("verify", "ix").returncode == 0
    doc = json.loads(cli("query", "ix", "--task", task, "--example", 0, "-k", 100,
                         "--json").stdout)
    ids = {row["train_id"] for res in doc["results"] for row in res["proponents"]}
    assert ids and not ids & {3, 17, 50, 51}


# ----------------------------------------------------------------------------- kill -9

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = {paths!r}
    import torch
    import grass_index as gi
    import grass_index.living.commit as commit
    import grass_index.pipeline.pass2 as pass2
    from grass_index.store import SketchStore
    from test_living import DATA, loss_fn, make_model

    op, out, point = sys.argv[1], sys.argv[2], sys.argv[3]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(module, name):
        real = getattr(module, name)
        def wrapped(*a, **k):
            got = real(*a, **k)
            die()
        setattr(module, name, wrapped)

    if point == "grow_block":
        real = SketchStore.grow_block
        def grown(self, *a, **k):
            real(self, *a, **k)
            die()
        SketchStore.grow_block = grown
    elif point == "fisher":
        after(commit, "update_fisher")
    elif point in ("before_config", "after_config"):
        real_write = pass2.write_json
        def write(path, obj):
            if str(path).endswith("config.json") and point == "before_config":
                die()
            real_write(path, obj)
            if str(path).endswith("config.json"):
                die()
        pass2.write_json = write

    def progress(stage, done, total):
        if point in (stage, f"{{stage}}:{{done}}"):
            die()

    if op == "add":
        gi.add_examples(out, make_model(), DATA, loss_fn, progress=progress)
    else:
        gi.remove_examples(out, [3, 17, 40], progress=progress)
""")


def snapshot(out: Path) -> dict:
    """What a reader of the index sees: config.json (less its timestamp), the FAISS bytes,
    the exact scores."""
    cfg = json.loads((out / "config.json").read_text())
    faiss = {name: (out / name).read_bytes() for name in cfg["index_files"]}
    cfg.pop("created")
    cfg.pop("config_hash")
    return dict(cfg=cfg, faiss=faiss, scores=scores(gi.open_index(out)))


def equal(a: dict, b: dict) -> bool:
    return a["cfg"] == b["cfg"] and a["faiss"] == b["faiss"] and torch.equal(a["scores"],
                                                                             b["scores"])


@pytest.mark.slow
@pytest.mark.parametrize("op, points", [
    ("add", ["grow_block", "sketch:7", "fisher", "index", "before_config", "after_config"]),
    ("remove", ["fisher", "index", "before_config", "after_config"])])
def test_kill_9_during_a_change_leaves_the_old_or_the_new_generation(tmp_path, op, points):
    import shutil

    base = tmp_path / "base"
    build(base, 44)
    old = snapshot(base)
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(paths=[str(Path(gi.__file__).parents[1]),
                                         str(Path(__file__).parent)]))
    subprocess.run([sys.executable, child, op, ref, "none"], check=True)
    new = snapshot(ref)
    for point in points:
        out = tmp_path / point.replace(":", "-")
        shutil.copytree(base, out)
        p = subprocess.run([sys.executable, child, op, out, point], capture_output=True,
                           text=True)
        assert p.returncode == -signal.SIGKILL, (point, p.stderr)
        now = snapshot(out)
        assert equal(now, old) or equal(now, new), point  # never a mix
        committed = equal(now, new)
        assert committed == (point == "after_config"), point
        if not committed:  # re-running the change resumes it
            subprocess.run([sys.executable, child, op, out, "none"], check=True)
        else:  # the next command settles build.json (written after the commit)
            gi.build_index(make_model(), DATA if op == "add" else first(44), loss_fn, out,
                           **KW)
        assert equal(snapshot(out), new), point
        assert gi.verify_index(out)["ok"], point
