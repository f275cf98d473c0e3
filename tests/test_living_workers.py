"""A living index grown by several processes (grass_index/living/workers.py): `add --worker
I/N` shards + `merge`, and a torchrun add, equal a single-process add (the same sketches bit
for bit, the same generation, scores to float rounding); a killed worker resumes; shards of
another generation or other new data are refused, naming the fix."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import grass_index as gi
import grass_index.living.workers as workers

from test_living import DATA, KW, first, growing_task, loss_fn, make_model, rows, same, scores

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ADD = dict(progress=False)


def built(out, n_old):
    gi.build_index(make_model(), first(n_old), loss_fn, out, **KW)
    return out


def shard(out, worker, data=DATA, **kw):
    return gi.add_shard(out, make_model(), data, loss_fn, worker, **{**ADD, **kw})


@pytest.fixture(scope="module", params=[44, 40])  # the old last batch short (filled up); full
def single(request, tmp_path_factory):
    """A single-process add of examples n_old..59: the reference."""
    out = built(tmp_path_factory.mktemp("single") / "ix", request.param)
    idx = gi.add_examples(out, make_model(), DATA, loss_fn, **ADD)
    return request.param, idx


def assert_same_add(idx, ref):
    assert np.array_equal(rows(idx.path), rows(ref.path))  # the sketches, bit for bit
    assert idx.config["generation"] == ref.config["generation"]
    for key in ("n_train", "sketch_hash", "damping_used", "index_kind", "task"):
        assert idx.config[key] == ref.config[key], key
    assert same(scores(idx), scores(ref), tol=1e-6)
    assert not (Path(idx.path) / "adds").exists()  # deleted once committed
    assert gi.verify_index(idx.path)["ok"]


def test_worker_shards_and_merge_equal_a_single_process_add(tmp_path, single):
    n_old, ref = single
    out = built(tmp_path / "ix", n_old)
    infos = [shard(out, f"{i}/3") for i in range(3)]
    assert sum(i.rows for i in infos) == 60 - n_old
    assert {i.n_batches for i in infos} == {len(range(n_old // 8, 8))}
    assert gi.open_index(out).n_train == n_old  # nothing committed before the merge
    assert_same_add(gi.merge_shards(out, progress=False), ref)


KILL_WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = {paths!r}
    import grass_index as gi
    from test_living import DATA, loss_fn, make_model

    def progress(stage, done, total):
        if (stage, done) == ("sketch", 1):  # one batch committed, the next not
            os.kill(os.getpid(), signal.SIGKILL)

    gi.add_shard(sys.argv[1], make_model(), DATA, loss_fn, "0/1", progress=progress)
""")


def test_a_killed_worker_resumes_and_an_interrupted_merge_finishes(tmp_path, single,
                                                                   monkeypatch):
    n_old, ref = single
    out = built(tmp_path / "ix", n_old)
    child = tmp_path / "child.py"
    child.write_text(KILL_WORKER.format(paths=[str(TESTS), str(REPO)]))
    p = subprocess.run([sys.executable, child, out], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    with gi.open_index(out) as idx:  # the index is untouched
        assert idx.n_train == n_old
    seen = []
    shard(out, "0/1", progress=lambda s, d, t: seen.append((s, d, t)))
    assert [(d, t) for s, d, t in seen if s == "sketch"][0] == (1, len(range(-(-n_old // 8), 8)))

    def stop(stage, done, total):  # the merge stops half-way through its copy
        if (stage, done) == ("merge", 1):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        gi.merge_shards(out, progress=stop)
    def interrupted(path):  # committed, the shards not yet deleted
        raise KeyboardInterrupt
    monkeypatch.setattr(workers, "delete_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gi.merge_shards(out, progress=False)
    monkeypatch.undo()
    assert (out / "adds").is_dir()
    assert gi.open_index(out).generation == 1
    assert_same_add(gi.merge_shards(out, progress=False), ref)  # only deletes the shards


def test_mismatched_shards_are_refused_naming_the_fix(tmp_path):
    out = built(tmp_path / "ix", 44)
    changed = torch.utils.data.TensorDataset(DATA.tensors[0].clone(), DATA.tensors[1].clone())
    changed.tensors[0][3] += 1  # an indexed example: batch 0, checked by worker 0 of 2
    shard(out, "1/2", data=changed)  # (worker 1 checks the odd batches)
    with pytest.raises(gi.AttributionError, match="training example 3 differs from the one "
                       "indexed"):
        shard(out, "0/2", data=changed)
    shutil.rmtree(out / "adds")
    other = torch.utils.data.TensorDataset(DATA.tensors[0].clone(), DATA.tensors[1].clone())
    other.tensors[0][50] += 1  # a new example differs
    shard(out, "0/2")
    with pytest.raises(gi.AttributionError, match=r"missing add shards 1-of-2; run add_shard\("
                       r".*, '1/2'\)"):
        gi.merge_shards(out, progress=False)
    shard(out, "1/2", data=other)
    with pytest.raises(gi.AttributionError, match=r"add shard 1-of-2 was sketched over other "
                       r"new examples \(training examples 50 differ\).*delete .*adds and "
                       r"re-run add_shard for every worker"):
        gi.merge_shards(out, progress=False)
    with pytest.raises(gi.AttributionError, match="was sketched over other new examples"):
        shard(out, "1/2")  # a worker re-run over other data than its shard's
    with pytest.raises(gi.AttributionError, match="holds the shards of an add split 2 ways; "
                       r"finish it with merge_shards\("):
        shard(out, "0/3")
    with pytest.raises(gi.AttributionError, match="holds the shards of a split add"):
        gi.add_examples(out, make_model(), DATA, loss_fn, **ADD)  # would sketch them twice
    # the index changes under the shards: they extend a generation that is gone
    shutil.rmtree(out / "adds" / "1-of-2")
    shard(out, "1/2")
    gi.remove_examples(out, [3])
    with pytest.raises(gi.AttributionError, match=r"sketched for generation 0 of the index, "
                       r"not generation 1 \(the index changed since\); delete .*adds"):
        gi.merge_shards(out, progress=False)
    with pytest.raises(gi.AttributionError, match="sketched for generation 0 of the index, "
                       "not generation 1"):
        shard(out, "0/2")
    assert gi.open_index(out).n_train == 44  # nothing was committed


def test_cli_add_worker_then_merge(tmp_path):
    from grass_index.cli.main import app

    task = growing_task(tmp_path, 44)
    run = CliRunner().invoke
    opts = ["--projection", "sjlt-8", "--sparsification", "random_mask-4*3", "--batch-size", "8"]
    assert run(app, ["build", str(task), "--out", str(tmp_path / "ix"), *opts]).exit_code == 0
    growing_task(tmp_path, 60)
    for w in ("0/2", "1/2"):
        r = run(app, ["add", str(tmp_path / "ix"), "--task", str(task), "--worker", w])
        assert r.exit_code == 0, r.output
        assert f"sketched add shard {w}" in r.output and "grass-index merge" in r.output
        if w == "0/2":  # errors in CLI spelling
            r = run(app, ["merge", str(tmp_path / "ix")])
            assert r.exit_code == 1 and "missing add shards 1-of-2; run `grass-index add" in \
                r.output and "--worker 1/2`" in r.output, r.output
    r = run(app, ["merge", str(tmp_path / "ix")])
    assert r.exit_code == 0, r.output
    idx = gi.open_index(tmp_path / "ix")
    assert idx.generation == 1 and idx.n_train == 60
    assert not (tmp_path / "ix" / "adds").exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_add_equal_a_single_process_add(tmp_path):
    task = growing_task(tmp_path, 44)
    t = gi.load_task(task)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        gi.build_index(t.model(), t.train_data(), t.loss, out, task=t.ref, **KW)
    growing_task(tmp_path, 60)
    t = gi.load_task(task)
    ref = gi.add_examples(a, t.model(), t.train_data(), t.loss, task=t.ref, **ADD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                          "-m", "grass_index", "add", str(b), "--task", str(task)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("grew") == 1  # rank 0 reports
    log = res.stdout + res.stderr
    assert "worker 0/2 sketches" in log and "worker 1/2 sketches" in log  # each rank its share
    assert_same_add(gi.open_index(b), ref)
