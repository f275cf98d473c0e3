"""The shape of the public API: one error base, the façade, options and the config view,
shard builds, example files, progress without a terminal, `python -m grass_index`."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import grass_index as gi
from _tiny_task import write_task

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(sparsification="random_mask-4*3", projection="sjlt-8", batch_size=8, progress=False)


def test_every_stage_error_derives_from_grass_index_error_and_keeps_its_base():
    from grass_index.capture import CaptureError
    from grass_index.compress import CompressError
    from grass_index.eval import EvalError
    from grass_index.index import FaissIndexError
    from grass_index.maskfit import MaskFitError
    from grass_index.precondition import PreconditionError
    from grass_index.store import StoreError, WriterLockedError
    from grass_index.task import TaskError

    value_errors = [CaptureError, CompressError, EvalError, MaskFitError, PreconditionError,
                    TaskError, gi.AttributionError]
    for cls in value_errors + [FaissIndexError, StoreError, WriterLockedError]:
        assert issubclass(cls, gi.GrassIndexError), cls
    for cls in value_errors:
        assert issubclass(cls, ValueError), cls
    assert issubclass(StoreError, RuntimeError) and issubclass(FaissIndexError, RuntimeError)
    # what the stages raise on bad input is ours
    with pytest.raises(gi.GrassIndexError, match="bad compression spec"):
        gi.parse_spec("sjlt-")
    with pytest.raises(gi.GrassIndexError, match="bad damping"):
        gi.IndexOptions(damping="lots")
    with pytest.raises(gi.GrassIndexError, match="unknown hessian"):
        gi.IndexOptions(hessian="gauss-newton")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return gi.load_task(str(write_task(tmp_path_factory.mktemp("task"), n_train=20)))


def test_build_shard_and_merge_through_the_public_api(task, tmp_path):
    out = tmp_path / "idx"
    opts = gi.BuildOptions(sparsification="random_mask-4*3", projection="sjlt-8", batch_size=8)
    infos = [gi.build_shard(task.model(), task.train_data(), task.loss, out, (i, 2), opts,
                            gi.IndexOptions(hessian="identity"), task=task.ref, progress=False)
             for i in range(2)]
    assert [(s.shard, s.batches, s.rows) for s in infos] == [("0/2", 2, 12), ("1/2", 1, 8)]
    assert infos[0].n_batches == 3
    idx = gi.merge_shards(out, progress=False)
    view = idx.settings
    assert isinstance(view, gi.IndexConfig)
    assert (view.n_train, view.hessian, view.index_kind, view.batch_size) == (20, "identity",
                                                                              "flat", 8)
    assert view.layout == {"0": 8, "2": 8} and view.dim == 16 and view.recall["k"] == 10
    assert view.raw["config_hash"] == idx.config["config_hash"]
    with pytest.raises(TypeError):
        view.raw["n_train"] = 3  # read-only
    with pytest.raises(gi.AttributionError, match="worker"):
        gi.build_shard(task.model(), task.train_data(), task.loss, tmp_path / "x", "2/2",
                       task=task.ref, progress=False)


def test_build_options_are_build_json(task, tmp_path):
    import json

    idx = gi.build_index(task.model(), task.train_data(), task.loss, tmp_path / "idx",
                         layers="0.*, 2.*", task=task.ref, **SMALL)
    build = json.loads((tmp_path / "idx" / "build.json").read_text())
    opts = gi.BuildOptions(sparsification="random_mask-4*3", projection="sjlt-8", batch_size=8,
                           layers="0.*, 2.*")
    assert {k: build[k] for k in opts.record()} == opts.record()
    assert build["layers"] == ["0.*", "2.*"] and build["batch_size"] == 8
    assert idx.reporting and idx.settings.n_blocks == 3


def test_load_examples(tmp_path):
    np.savez(tmp_path / "q.npz", x=np.zeros((3, 6)), y=np.arange(3))
    items = gi.load_examples(tmp_path / "q.npz")
    assert len(items) == 3 and items[0][0].dtype == torch.float32 and int(items[2][1]) == 2
    torch.save(torch.ones(4, 6), tmp_path / "q.pt")
    assert len(gi.load_examples(tmp_path / "q.pt")) == 4
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 6)), y=np.arange(2))
    with pytest.raises(gi.AttributionError, match="different lengths"):
        gi.load_examples(tmp_path / "bad.npz")
    (tmp_path / "q.csv").write_text("1,2\n")
    with pytest.raises(gi.AttributionError, match="unknown file type"):
        gi.load_examples(tmp_path / "q.csv")
    with pytest.raises(gi.AttributionError, match="not found"):
        gi.load_examples(tmp_path / "none.npz")


def test_progress_without_a_terminal_prints_periodic_lines():
    from grass_index.pipeline import Progress

    seen, stream = [], io.StringIO()
    prog = Progress(True, stream=stream, every=0.0)
    for done in range(1, 5):
        prog("sketch", done, 4)
    prog("done", 1, 1)
    prog.close()
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("pass 1: sketching gradients: ") for line in lines)
    assert lines[-1].startswith("pass 1: sketching gradients: 4/4, ") and "/s, ETA" in lines[-1]
    quiet = io.StringIO()
    prog = Progress(True, stream=quiet)  # the default ~10 s: a short phase prints nothing
    for done in range(1, 5):
        prog("sketch", done, 4)
    assert quiet.getvalue() == ""
    Progress(lambda *a: seen.append(a))("index", 1, 2)
    assert seen == [("index", 1, 2)]


def test_build_plan_and_eta_lines_go_through_progress(task, tmp_path, caplog):
    """The plan line (before pass 1) and the first-batch ETA are lines of the one Progress:
    among the log lines without a terminal, the logger at INFO behind a caller's callback."""
    from grass_index.pipeline import Progress

    stream = io.StringIO()
    prog = Progress(True, stream=stream)  # no terminal: lines, ~10 s apart (none here)
    prog.note("plan: RAM peak 1.00 GB")
    prog.eta_after_first("sketch", 5.0, "pass 2")
    for done in range(0, 4):
        prog("sketch", done, 4)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "plan: RAM peak 1.00 GB"
    assert len(lines) == 2 and lines[1].startswith("ETA: pass 1: sketching gradients ")
    assert lines[1].endswith("pass 2 about 5.0 s")
    seen = []
    with caplog.at_level("INFO", logger="grass_index"):
        gi.build_index(task.model(), task.train_data(), task.loss, tmp_path / "idx",
                       **dict(SMALL, progress=lambda *a: seen.append(a)))
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("plan: RAM peak ") and "disk" in m for m in msgs)
    assert any(m.startswith("ETA: pass 1") for m in msgs)
    assert seen and seen[-1][0] == "done"


def test_layer_table_says_one_phrase_per_stage():
    from grass_index.cli.render import layer_stages

    desc = {"sparsification": "identity-65*10", "projection": "identity", "k": 650,
            "requested": {"sparsification": "random_mask-128*128", "projection": "sjlt-4096"}}
    assert layer_stages(desc, {}) == ("in: exact (65 ≤ 128), out: exact (10 ≤ 128), "
                                      "proj: exact (650 ≤ 4096)")
    desc = {"sparsification": "random_mask-128*128", "projection": "sjlt-4096", "k": 4096,
            "requested": {"sparsification": "random_mask-128*128", "projection": "sjlt-4096"}}
    assert layer_stages(desc, {}) == "in: random_mask-128, out: random_mask-128, proj: sjlt-4096"


def test_python_dash_m_grass_index():
    res = subprocess.run([sys.executable, "-m", "grass_index", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert "build" in res.stdout and "merge" in res.stdout
