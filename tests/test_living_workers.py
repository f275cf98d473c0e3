"""A living index grown by several processes (grass_index/living/workers.py): `add --worker
I/N` shards + `merge`, and a torchrun add, equal a single-process add (the same sketches bit
for bit, the same generation, scores to float rounding); a killed worker resumes; shards of
another generation or other new data are refused, naming the fix."""
from __future__ import annotations

import dataclasses
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


# ------------------------------------------- `build --worker` over grown data; bad paths

CLI_OPTS = ["--projection", "sjlt-8", "--sparsification", "random_mask-4*3", "--batch-size", "8"]


def _cli(*args):
    from grass_index.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r) -> str:
    """The CLI failed cleanly: exit 1, one `error:` line, no traceback; that line."""
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.exception is None or \
        isinstance(r.exception, SystemExit), r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_cli_build_worker_over_grown_data_names_the_add_worker_command(tmp_path):
    import shlex

    task, out = growing_task(tmp_path, 44), tmp_path / "ix"
    assert _cli("build", task, "--out", out, *CLI_OPTS).exit_code == 0
    growing_task(tmp_path, 60)
    line = _one_line_error(_cli("build", task, "--out", out, *CLI_OPTS, "--worker", "1/2"))
    assert "different build" not in line, line
    add = f"`grass-index add {out} --task {task} --worker 1/2`"
    assert add in line and f"`grass-index merge {out}`" in line, line
    assert "add_shard(" not in line and not (out / "shards").exists()
    assert gi.open_index(out).n_train == 44
    # the command it names works: every worker's add, then the merge
    for w in ("0/2", "1/2"):
        argv = shlex.split(add.strip("`").replace("1/2", w))
        assert argv[0] == "grass-index"
        r = _cli(*argv[1:])
        assert r.exit_code == 0, r.output
    assert _cli("merge", out).exit_code == 0
    assert gi.open_index(out).n_train == 60


def test_build_shard_over_grown_data_names_add_shard_but_other_builds_stay_different(tmp_path):
    out = built(tmp_path / "ix", 44)
    opts = gi.BuildOptions(sparsification=KW["sparsification"],
                           projection=KW["projection"], batch_size=8)

    def build_shard(data=DATA, options=opts, model=None):
        return gi.build_shard(model or make_model(), data, loss_fn, out, "0/3", options,
                              progress=False)

    with pytest.raises(gi.AttributionError) as e:
        build_shard()
    msg = str(e.value)
    assert (f"add_shard({str(out)!r}, model, train_data, loss_fn, '0/3')" in msg
            and f"merge_shards({str(out)!r})" in msg), msg
    assert "grass-index" not in msg and "--" not in msg and "\n" not in msg
    # genuinely different builds are refused as before: other settings, model or indexed data
    other_seed = dataclasses.replace(opts, seed=1)
    changed = torch.utils.data.TensorDataset(DATA.tensors[0].clone(), DATA.tensors[1].clone())
    changed.tensors[0][3] += 1  # an indexed example changed, the data longer
    other = make_model()
    with torch.no_grad():
        other[0].weight += 1
    for kw, why in ((dict(options=other_seed), "seed"), (dict(model=other), "model_hash"),
                    (dict(data=changed), "data_hash")):
        with pytest.raises(gi.AttributionError, match=f"holds a different build .*{why}"):
            build_shard(**kw)
    assert not (out / "shards").exists() and gi.open_index(out).n_train == 44


def test_merge_and_add_name_a_file_or_a_missing_path_in_one_line(tmp_path):
    out = built(tmp_path / "ix", 44)
    a_file, missing = tmp_path / "a-file", tmp_path / "missing"
    a_file.write_text("not an index\n")
    model = make_model()
    calls = {
        "merge_shards": lambda p: gi.merge_shards(p, progress=False),
        "add_shard": lambda p: gi.add_shard(p, model, DATA, loss_fn, "0/2", progress=False),
        "add_examples": lambda p: gi.add_examples(p, model, DATA, loss_fn, progress=False),
        "remove_examples": lambda p: gi.remove_examples(p, [1]),
    }
    for name, call in calls.items():
        for path, what in ((a_file, "is a file, not a directory"), (missing, "not found")):
            with pytest.raises(gi.AttributionError) as e:
                call(path)
            msg = str(e.value)
            assert str(path) in msg and what in msg and "\n" not in msg, (name, msg)
            assert "grass-index" not in msg and "Errno" not in msg, (name, msg)
        with pytest.raises(TypeError, match=rf"{name}: (path|out) must be"):
            call(None)  # (arguments.ArgumentError: a GrassIndexError too)
    assert a_file.read_text() == "not an index\n" and not missing.exists()
    assert gi.open_index(out).n_train == 44


def test_cli_merge_and_add_name_a_file_or_a_missing_path_in_one_line(tmp_path):
    task = growing_task(tmp_path, 60)
    a_file, missing = tmp_path / "a-file", tmp_path / "missing"
    a_file.write_text("not an index\n")
    for path, what in ((a_file, "is a file, not a directory"), (missing, "not found")):
        for args in (["merge", path], ["add", path, "--task", task, "--worker", "0/2"],
                     ["add", path, "--task", task]):
            line = _one_line_error(_cli(*args))
            assert str(path) in line and what in line and "Errno" not in line, (args, line)
            assert "_shard(" not in line and "build_index(" not in line, (args, line)
    assert a_file.read_text() == "not an index\n" and not missing.exists()


def test_the_add_command_names_the_task_as_the_command_line_does():
    import json

    from grass_index.errors import cli_spelling
    from grass_index.task import task_flags

    ref = "hf-lm:" + json.dumps(dict(model="/models/tiny gpt", data="/d/corpus.txt",
                                     text_field=None, max_length=64, dtype="bfloat16"),
                                sort_keys=True)
    with cli_spelling():
        assert task_flags(ref) == ("--hf-model '/models/tiny gpt' --data /d/corpus.txt "
                                   "--max-length 64 --dtype bfloat16")
        assert task_flags("/t/my task.py:obj") == "--task '/t/my task.py:obj'"
        assert task_flags(None) is None
    assert task_flags(ref) == f"task={ref!r}"  # (Python: the call's argument)


def test_a_merge_keeps_the_column_order_of_a_model_with_ten_layers_of_a_kind(tmp_path):
    """Twelve linear layers "0".."11": the shards' JSON record sorts them "0", "1", "10", "11",
    "2", ..., while the sketch holds them in model order. The merge must slice each layer's
    own columns (it once fitted layers 2..11 on other layers' columns: a split add of a
    12-block GPT-2 scored unlike a one-process add by 340 on a top score of 1,540)."""
    def deep():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(11)],
                                   torch.nn.Linear(6, 3)).eval()
    kw = dict(KW, sparsification="identity", projection="identity")
    refs = {}
    for name in ("single", "split"):
        out = tmp_path / name
        gi.build_index(deep(), first(40), loss_fn, out, **kw)
        if name == "single":
            refs[name] = gi.add_examples(out, deep(), DATA, loss_fn, **ADD)
        else:
            for i in range(2):
                gi.add_shard(out, deep(), DATA, loss_fn, f"{i}/2", **ADD)
            refs[name] = gi.merge_shards(out, progress=False)
    single, split = refs["single"], refs["split"]
    assert list(split.layout) == [str(i) for i in range(12)]
    assert split.config["damping_used"] == single.config["damping_used"]
    q = torch.from_numpy(rows(single.path)[:5])
    assert same(split.score_sketches(q), single.score_sketches(q), tol=1e-6)
    assert gi.verify_index(split.path)["ok"]
