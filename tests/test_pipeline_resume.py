"""Interrupted builds resume to the same index: bit-identical sketches, identical scores."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import grass_index as gi
from grass_index.store import SketchStore, WriterLockedError

from test_pipeline import PROJ, SPARS, loss_fn, make_data, make_model

N = 60


def sketches(out):
    with SketchStore.open(out / "sketches", readonly=True) as st:
        return np.concatenate([rows for _, rows in st.iter_blocks()])


def build(out, loss=loss_fn, **kw):
    return gi.build_index(make_model(), make_data(N, 1), loss, out, sparsification=SPARS,
                          projection=PROJ, batch_size=8, progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    idx = build(out)
    return sketches(out), idx.score(make_model(), make_data(5, 2), loss_fn)


def test_resume_after_exception_is_identical(tmp_path, reference):
    ref_sk, ref_scores = reference
    x24 = make_data(N, 1)[24][0]

    def flaky(model, batch):  # fails on batch 3 (examples 24..31), whatever calls came before
        if torch.is_grad_enabled() and torch.equal(batch[0][0], x24):
            raise RuntimeError("injected failure")
        return loss_fn(model, batch)

    out = tmp_path / "run"
    # the user's loss failed: a TaskError naming the training ids, chained to the RuntimeError
    with pytest.raises(gi.task.TaskError, match="training examples 24..31.*injected"):
        build(out, loss=flaky)
    with SketchStore.open(out / "sketches", readonly=True) as st:
        assert st.committed_blocks == 3  # three batches committed before the failure
    with pytest.raises(ValueError, match="not finished"):
        gi.open_index(out)
    done = {"sketch": []}
    idx = gi.build_index(make_model(), make_data(N, 1), loss_fn, out, sparsification=SPARS,
                         projection=PROJ, batch_size=8,
                         progress=lambda st, d, t: done.setdefault(st, []).append(d))
    assert done["sketch"][0] == 3  # resumed at the first uncommitted batch
    np.testing.assert_array_equal(sketches(out), ref_sk)
    assert torch.equal(idx.score(make_model(), make_data(5, 2), loss_fn), ref_scores)


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import grass_index as gi
    from test_pipeline import PROJ, SPARS, loss_fn, make_data, make_model

    def slow_loss(model, batch):
        time.sleep(0.05)
        return loss_fn(model, batch)

    def progress(stage, done, total):
        print(stage, done, flush=True)
        if stage == {stall!r}:
            time.sleep(0.3)

    gi.build_index(make_model(), make_data({n}, 1), slow_loss, sys.argv[1], sparsification=SPARS,
                   projection=PROJ, batch_size=8, progress=progress)
    print("finished", flush=True)
""")


def run_and_kill(tmp_path, out, stage, at):
    """Start a build in a subprocess and SIGKILL it when it reports `stage` reaching `at`."""
    script = tmp_path / f"build_{stage}.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__), n=N, stall=stage))
    p = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            st, _, d = line.partition(" ")
            if st == stage and int(d) >= at:
                os.kill(p.pid, signal.SIGKILL)
                break
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read()


def test_kill_9_in_both_passes_then_resume_is_identical(tmp_path, reference):
    ref_sk, ref_scores = reference
    out = tmp_path / "run"
    run_and_kill(tmp_path, out, "sketch", 3)  # pass 1
    with SketchStore.open(out / "sketches", readonly=True) as st:
        assert 3 <= st.committed_blocks < 8
    run_and_kill(tmp_path, out, "fisher", 1)  # pass 2 (pass 1 finishes first)
    assert not (out / "config.json").exists()
    idx = build(out)
    np.testing.assert_array_equal(sketches(out), ref_sk)
    assert torch.equal(idx.score(make_model(), make_data(5, 2), loss_fn), ref_scores)
    from grass_index.attribute import verify_index

    assert verify_index(out)["ok"]


def test_second_writer_is_refused(tmp_path):
    out = tmp_path / "run"
    build(out)
    with SketchStore.open(out / "sketches", readonly=False):
        with pytest.raises(WriterLockedError):
            build(out, damping=0.5)


def test_a_build_started_by_an_earlier_version_is_named_as_such(tmp_path):
    """build.json gains keys over versions (e.g. left_out): resuming a directory whose record
    lacks one says an earlier version started it, not that the user changed something."""
    import json

    out = tmp_path / "run"
    gi.build_index(make_model(), make_data(16, 1), loss_fn, out, sparsification=SPARS,
                   projection=PROJ, batch_size=8, progress=False)
    rec = json.loads((out / "build.json").read_text())
    del rec["left_out"]
    (out / "build.json").write_text(json.dumps(rec))
    (out / "config.json").unlink()  # an unfinished build, to be resumed
    with pytest.raises(gi.AttributionError, match="differs in: left_out.*earlier grass-index "
                       "version"):
        gi.build_index(make_model(), make_data(16, 1), loss_fn, out, sparsification=SPARS,
                       projection=PROJ, batch_size=8, progress=False)
