"""Builds split over workers (`build --worker i/n` + `merge`) and over torchrun ranks equal a
single-process build: the same raw sketches, bit for bit; the Fisher (summed per shard, then
added or all-reduced) and so the scores to float64 rounding."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import grass_index as gi
from grass_index.attribute import AttributionError, verify_index
from _tiny_task import write_task
from grass_index.cli.main import app
from grass_index.index import VectorIndex
from grass_index.store import SketchStore

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(sparsification="random_mask-4*3", projection="sjlt-8", batch_size=8, seed=0,
            progress=False)
CLI_OPTS = ["--sparsification", "random_mask-4*3", "--projection", "sjlt-8", "--batch-size", "8"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    # 45 rows: 6 batches of 8, the last one short
    return gi.load_task(str(write_task(tmp_path_factory.mktemp("task"), n_train=45)))


def build(task, out, **kw):
    return gi.build_index(task.model(), task.train_data(), task.loss, out, task=task.ref,
                          **{**OPTS, **kw})


def shard(task, out, worker, **kw):
    """One worker's shard (gi.build_shard) with build()'s options."""
    o = {**OPTS, **kw}
    index_options = gi.IndexOptions(**{k: o.pop(k) for k in ("hessian", "damping", "index")
                                       if k in o})
    progress = o.pop("progress")
    return gi.build_shard(task.model(), task.train_data(), task.loss, out, worker,
                          gi.BuildOptions(**o), index_options, task=task.ref, progress=progress)


@pytest.fixture(scope="module")
def single(task, tmp_path_factory):
    return build(task, tmp_path_factory.mktemp("single") / "idx")


def raw_blocks(path):
    with SketchStore.open(Path(path) / "sketches") as st:
        return [(s, r) for s, r in st.iter_blocks()]


def scores(idx, task):
    return idx.score(task.model(), task.query_data(), task.loss).numpy()


def assert_same_index(a, b, task, *, exact=True):
    ra, rb = raw_blocks(a.path), raw_blocks(b.path)
    assert [s for s, _ in ra] == [s for s, _ in rb]
    for (_, x), (_, y) in zip(ra, rb):
        if exact:
            assert x.tobytes() == y.tobytes()
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    sa, sb = scores(a, task), scores(b, task)
    # the Fisher sums differ in float32 GEMM rounding (each worker sums its own rows): with
    # damping "auto" (smaller λ than 0.3 × mean on these layers) that shows at ~5e-7 of the
    # largest score, so the absolute tolerance scales with the scores
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=2e-6 * np.abs(sb).max())
    ca, cb = a.config, b.config
    for k in ("n_train", "dim", "layout", "sketch_hash", "task",
              "item_signature", "layers_described", "hessian", "index_kind", "n_blocks",
              "capture", "left_out"):
        assert ca[k] == cb[k], k
    for layer, lam in ca["damping_used"].items():
        # float32 GEMMs per chunk (or Woodbury from the rows when n < k/2) sum differently;
        # "auto" reads λ off a small eigenvalue, whose relative error is that rounding (~1e-7
        # of the top eigenvalue) over its distance below the top
        assert lam == pytest.approx(cb["damping_used"][layer], rel=1e-4)
    fa, fb = fisher_cache(a.path), fisher_cache(b.path)
    for layer in fa.keys() & fb.keys():  # a single build with n < k/2 caches no Fisher
        np.testing.assert_allclose(fa[layer], fb[layer], rtol=1e-5, atol=1e-9)


def fisher_cache(path):
    with SketchStore.open(Path(path) / "sketches") as st:
        if not st.get_meta("fisher_done"):
            return {}
        assert st.get_meta("fisher_n") == 45
        return {n[len("fisher/"):]: st.get_array(n) for n in st.array_names()
                if n.startswith("fisher/")}


@pytest.mark.parametrize("n", [2, 4])
def test_workers_then_merge_equal_single_process(task, single, tmp_path, n):
    out = tmp_path / "idx"
    order = list(range(n))[::-1]  # any order
    for i in order:
        info = shard(task, out, (i, n))
        assert info.shard == f"{i}/{n}" and info.batches == len(range(i, 6, n))
    assert not (out / "config.json").exists()
    with pytest.raises(AttributionError, match="not finished"):
        gi.open_index(out)
    idx = gi.merge_shards(out, progress=False)
    assert_same_index(idx, single, task)
    assert verify_index(out)["ok"]
    # merging again is a no-op that gives the same index
    again = gi.merge_shards(out, progress=False, remove_shards=True)
    assert_same_index(again, single, task)
    assert not (out / "shards").exists()


def test_workers_sum_their_own_fisher_and_merge_adds_them(task, single, tmp_path, monkeypatch):
    """Each eFIM worker caches its rows' ĝĝᵀ sums; merge adds those instead of re-reading all
    sketches. A worker told hessian=identity skips them; merge computes them when eFIM is asked
    for at merge time."""
    from grass_index.pipeline import pass2
    from grass_index.pipeline.parallel import sharding

    out = tmp_path / "idx"
    for i in range(3):
        shard(task, out, (i, 3))
        with SketchStore.open(out / "shards" / f"{i}-of-3") as st:
            assert st.get_meta("fisher_partial_n") == st.num_rows
    seen, real = [], pass2.accumulate

    def counting(store, *args, **kw):  # every full read of a store's sketches for the Fisher
        seen.append(store.path)
        return real(store, *args, **kw)
    monkeypatch.setattr(sharding, "accumulate", counting)
    monkeypatch.setattr(pass2, "accumulate", counting)
    assert_same_index(gi.merge_shards(out, progress=False), single, task)
    assert seen == []  # only the cached k×k sums were read

    out2 = tmp_path / "idx2"
    for i in range(2):
        shard(task, out2, (i, 2), hessian="identity")
        with SketchStore.open(out2 / "shards" / f"{i}-of-2") as st:
            assert st.get_meta("fisher_partial_n") is None
    assert_same_index(gi.merge_shards(out2, hessian="eFIM", progress=False), single, task)
    assert len(seen) == 2 and all("shards" in p for p in seen)  # each shard read once


def test_worker_resumes_and_merge_resumes(task, single, tmp_path):
    out = tmp_path / "idx"
    calls = []

    def stop_after_one(stage, done, total):
        calls.append((stage, done))
        if stage == "sketch" and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shard(task, out, "0/2", progress=stop_after_one)
    with pytest.raises(AttributionError, match=r"shard 0-of-2 is incomplete \(1 of 3 batches"):
        shard(task, out, "1/2")
        gi.merge_shards(out, progress=False)
    shard(task, out, "0/2")  # resumes at its second batch

    def stop_merge(stage, done, total):
        if stage == "merge" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gi.merge_shards(out, progress=stop_merge)
    assert_same_index(gi.merge_shards(out, progress=False), single, task)


def test_merge_reports_missing_duplicate_mismatched_shards(task, tmp_path):
    out = tmp_path / "idx"
    with pytest.raises(AttributionError, match="index directory .*idx not found; pass the "
                       "directory the workers wrote into"):
        gi.merge_shards(out, progress=False)
    out.mkdir()
    with pytest.raises(AttributionError, match="no build.json"):
        gi.merge_shards(out, progress=False)
    shard(task, out, (0, 3))
    shard(task, out, (2, 3))
    with pytest.raises(AttributionError, match=r"missing shards 1-of-3 .*build_shard\(model, "
                       r"train_data, loss_fn, '.*', '1/3'\)"):
        gi.merge_shards(out, progress=False)

    shutil.copytree(out / "shards" / "0-of-3", out / "shards" / "00-of-3")
    with pytest.raises(AttributionError, match="duplicate shards: 0-of-3, 00-of-3"):
        gi.merge_shards(out, progress=False)
    shutil.rmtree(out / "shards" / "00-of-3")

    shard(task, out, (0, 2))  # a stale split beside the 3-way one
    with pytest.raises(AttributionError, match="different splits"):
        gi.merge_shards(out, progress=False)
    with pytest.raises(AttributionError, match="missing shards 1-of-2"):
        gi.merge_shards(out, shards=2, progress=False)
    shutil.rmtree(out / "shards" / "0-of-2")

    # worker 1 of another build (other seed): the worker itself refuses the directory ...
    with pytest.raises(AttributionError, match="holds a different build .*seed"):
        shard(task, out, (1, 3), seed=1)
    # ... and a shard of another build copied in is refused by merge
    other = tmp_path / "other"
    shard(task, other, (1, 3), seed=1)
    shutil.copytree(other / "shards" / "1-of-3", out / "shards" / "1-of-3")
    with pytest.raises(AttributionError, match=r"shard 1-of-3 is a different build .*seed"):
        gi.merge_shards(out, progress=False)


def test_worker_argument_errors(task, tmp_path):
    for bad in ("2/2", "1/0", "a/b", "1-2", (3, 2)):
        with pytest.raises(AttributionError, match="worker"):
            shard(task, tmp_path / "x", bad)
    assert not (tmp_path / "x").exists()


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_worker_and_merge(task, single, tmp_path):
    out = tmp_path / "idx"
    task_file = task.ref.split(":")[0]
    r = _cli("build", task_file, "--out", out, *CLI_OPTS, "--worker", "1/2")
    assert r.exit_code == 0, r.output
    assert "sketched shard 1/2" in r.stdout and "grass-index merge" in r.stderr  # result, hint
    r = _cli("merge", out)
    assert r.exit_code != 0 and "missing shards 0-of-2" in " ".join(r.stderr.split())
    r = _cli("build", task_file, "--out", out, *CLI_OPTS, "--worker", "0/2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == 24, r.output
    r = _cli("merge", out, "--json")
    assert r.exit_code == 0, r.output
    assert_same_index(gi.open_index(out), single, task)
    r = _cli("build", task_file, "--out", out, *CLI_OPTS, "--worker", "3/2")
    assert r.exit_code != 0 and "0 <= i < n" in r.stderr


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CLOSE_SCRIPT = """
import os, sys
from grass_index.pipeline.parallel.distributed import Group
group = Group()
import torch._dynamo  # what the capture check imports while the group is up
group.step(lambda: 1)
group.close()
print(sorted(open(f"/proc/self/task/{t}/comm").read().strip()
             for t in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from /proc")
def test_closing_the_group_joins_gloos_threads():
    """A group we created is really freed by close(): gloo's worker threads are gone before
    the interpreter shuts down, where a worker releasing a collective's tensors cannot take
    the GIL and aborts the rank (the CI failure this guards against). Without
    _bind_world_defaults, torch.distributed.nn.functional's `group=group.WORLD` defaults,
    imported by torch._dynamo, kept the group and its 'pt_gloo_runloop' threads alive."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", _CLOSE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    threads = res.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads, threads


def torchrun(task, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "grass_index", "build", task.ref.split(":")[0], "--out", str(out),
           *CLI_OPTS, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_torchrun_gloo_two_ranks_equal_single_process(task, single, tmp_path):
    out = tmp_path / "idx"
    res = torchrun(task, out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["0-of-2", "1-of-2"]
    # same kernels on the same device: the sketches are bit-identical here too
    assert_same_index(gi.open_index(out), single, task)


def test_torchrun_ranks_scan_the_store(task, single, tmp_path):
    """An exact index scanned from the store (flat:scan): each rank scores its own raw rows
    for the recall lists and finds their saturated blocks; rank 0 commits the list. It answers
    as the single-process index does."""
    out = tmp_path / "idx"
    res = torchrun(task, out, "--index", "flat:scan")
    assert res.returncode == 0, res.stdout + res.stderr
    idx = gi.open_index(out)
    assert idx.settings.held_in_store and not list(out.glob("index-*.faiss"))
    q = single.query_sketches(task.model(), task.query_data(), task.loss)
    for a, b in zip(idx.search(q, 5), single.search(q, 5)):
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-4,
                                   atol=1e-5 * max(abs(s) for _, s in b))
    assert gi.verify_index(out)["ok"]


def test_torchrun_ranks_build_their_own_index_parts(task, single, tmp_path):
    """With shards=N in --index, a torchrun build keeps one FAISS part per rank (each rank
    preconditioned and indexed its own shard, from rank 0's IVF quantizer and fp16 scales):
    searched as one they answer like the single-process index, and recall is recorded."""
    out = tmp_path / "idx"
    res = torchrun(task, out, "--index", "ivf:fp16,shards=2")
    assert res.returncode == 0, res.stdout + res.stderr
    idx = gi.open_index(out)
    assert idx.config["index_kind"] == "ivf:fp16,shards=2"
    assert len(idx.config["index_files"]) == 2 and idx.config["index"]["parts"] == 2
    assert idx.config["index"]["recall"]["recall"] >= 0.9
    parts = [VectorIndex.load(out / f) for f in idx.config["index_files"]]
    held = [set(p.ids().tolist()) for p in parts]
    assert held[0] == {i for i in range(45) if (i // 8) % 2 == 0}  # rank 0: batches 0, 2, 4
    assert held[1] == set(range(45)) - held[0]
    s = scores(single, task)
    top = idx.query(task.model(), task.query_data(), task.loss, k=5)
    for r, row in enumerate(top):
        ids = [i for i, _ in row]
        np.testing.assert_allclose([v for _, v in row], s[r, ids], rtol=3e-3,
                                   atol=3e-3 * np.abs(s).max())
        assert s[r, ids[0]] >= s[r].max() - 5e-3 * np.abs(s).max()
    assert verify_index(out)["ok"]


def test_torchrun_remove_shards(task, single, tmp_path):
    out = tmp_path / "idx"
    res = torchrun(task, out, "--remove-shards")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (out / "shards").exists()
    assert_same_index(gi.open_index(out), single, task)
    with pytest.raises(AttributionError, match=r"build_index\(worker=...\) is gone: call "
                       r"grass_index.build_shard"):
        build(task, tmp_path / "w", worker="0/2", remove_shards=True)


def test_torchrun_error_on_one_rank_stops_every_rank(task, single, tmp_path):
    res = torchrun(task, single.path, "--seed", "3")  # rank 0 refuses the directory
    assert res.returncode != 0
    err = " ".join(res.stderr.split())
    assert "rank 0 of 2 failed: output directory" in err  # rank 1, told why, not left waiting
    assert err.count("holds a different build (differs in: seed)") == 2
