"""Crash safety of SketchStore with real processes: kill -9 mid-build, disk full, two writers.

Worker processes load grass_index.store without the package __init__ (which imports torch), so
each starts in ~0.3 s; the store itself does not use torch.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from grass_index.store import SketchStore

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "grass_index")
DIM, ROWS, NBLOCKS = 1024, 64, 40  # 256 KiB blocks: commits take long enough to be hit mid-way
META = {"spec": "sjlt-1024", "seed": 0}

PRELUDE = f"""
import sys, types, json, os, signal
pkg = types.ModuleType("grass_index"); pkg.__path__ = [{PKG!r}]; sys.modules["grass_index"] = pkg
import numpy as np
from grass_index.store import SketchStore, StoreError, WriterLockedError
def block(b):
    return np.random.default_rng(b).standard_normal(({ROWS}, {DIM})).astype(np.float32)
"""

WRITER = PRELUDE + f"""
path = sys.argv[1]
s = SketchStore.create(path, dim={DIM}, meta={META!r})
print("start", s.committed_blocks, flush=True)
for b in range(s.committed_blocks, {NBLOCKS}):
    s.put_block(b, b * {ROWS}, block(b))
    print("committed", b, flush=True)
    if b >= {NBLOCKS} // 2 and not s.has_array("fisher"):  # a resumed build redoes a lost step
        s.put_array("fisher", np.arange(3 * 2**20, dtype=np.float64).reshape(3, -1) + {NBLOCKS} // 2)
        s.put_meta("status", "half")
        print("array", flush=True)
s.put_meta("status", "cached")
s.close()
print("done", flush=True)
"""


def block(b):
    return np.random.default_rng(b).standard_normal((ROWS, DIM)).astype(np.float32)


def spawn(script, *args, **kw):
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_to_end(path):
    p = spawn(WRITER, path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return out


def kill_after(path, n_commits, extra_delay):
    """Start a writer, wait for n_commits 'committed' lines, sleep, then SIGKILL it."""
    p = spawn(WRITER, path)
    seen = -1
    while seen < n_commits - 1:
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith("committed"):
            seen = int(line.split()[1])
    time.sleep(extra_delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return seen + 1  # blocks known to be committed before the kill


def check_prefix(path):
    with SketchStore.open(path) as s:
        assert s.verify() == []
        n = s.committed_blocks
        assert s.num_rows == n * ROWS
        got = list(s.iter_blocks())
        assert len(got) == n
        for b, (start, rows) in enumerate(got):
            assert start == b * ROWS
            np.testing.assert_array_equal(rows, block(b))
        if s.has_array("fisher"):  # either the whole array or none of it
            a = s.get_array("fisher")
            assert a.shape == (3, 2**20) and a.dtype == np.float64
            np.testing.assert_array_equal(a, np.arange(3 * 2**20).reshape(3, -1) + NBLOCKS // 2)
        return n


def snapshot(path):
    with SketchStore.open(path) as s:
        return (s.meta, s.committed_blocks, s.num_rows,
                [(i, r.tobytes()) for i, r in s.iter_blocks()],
                s.get_array("fisher").tobytes(), s.all_meta())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "store")
    run_to_end(path)
    return snapshot(path)


@pytest.mark.parametrize("kills", [
    [(0, 0.0), (5, 0.013), (20, 0.004), (21, 0.02)],     # at start-up, mid-commit, around put_array
    [(2, 0.031), (NBLOCKS // 2 + 1, 0.0), (30, 0.007)],
])
def test_kill9_then_resume_matches_uninterrupted(tmp_path, reference, kills):
    path = str(tmp_path / "store")
    for n_commits, delay in kills:
        known = kill_after(path, n_commits, delay)
        if os.path.exists(os.path.join(path, "data.mdb")):
            have = check_prefix(path)
            assert have >= known  # every block reported committed survived the kill
    out = run_to_end(path)  # resume: continues from the committed prefix
    assert out.splitlines()[0].startswith("start")
    check_prefix(path)
    assert snapshot(path) == reference


def test_reader_sees_consistent_prefix_while_writer_runs(tmp_path):
    path = str(tmp_path / "store")
    p = spawn(WRITER, path)
    assert p.stdout.readline().startswith("start")
    counts = []
    try:
        while p.poll() is None and len(counts) < 30:
            counts.append(check_prefix(path))  # a separate read-only open each time
    finally:
        p.communicate(timeout=120)
    assert counts == sorted(counts)
    assert p.returncode == 0


def test_second_writer_process_is_refused_with_pid(tmp_path):
    path = str(tmp_path / "store")
    with SketchStore.create(path, dim=DIM, meta=META) as s:
        s.put_block(0, 0, block(0))
        script = PRELUDE + textwrap.dedent("""
            try:
                SketchStore.open(sys.argv[1], readonly=False)
            except WriterLockedError as e:
                print("LOCKED", e)
            r = SketchStore.open(sys.argv[1])          # a reader is fine meanwhile
            print("READ", r.committed_blocks, r.get_rows([5]).shape)
        """)
        p = spawn(script, path)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert f"pid {os.getpid()}" in out and "LOCKED" in out
        assert "READ 1 (1, 1024)" in out
    # the lock is released on close; and by the kernel when a writer is killed
    kill_after(path, 2, 0.0)
    with SketchStore.open(path, readonly=False) as s:
        assert s.committed_blocks >= 2


def test_write_failure_disk_full_leaves_last_committed_state(tmp_path):
    """RLIMIT_FSIZE makes the data file's growth fail with EFBIG, as a full disk would."""
    path = str(tmp_path / "store")
    script = PRELUDE + textwrap.dedent(f"""
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        s = SketchStore.create(sys.argv[1], dim={DIM}, meta={META!r})
        lim = 3 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
        try:
            for b in range(100):
                s.put_block(b, b * {ROWS}, block(b))
        except StoreError as e:
            print("ERR", s.committed_blocks, e)
        try:
            s.put_array("big", np.zeros(2**20))
        except StoreError as e:
            print("ERR2", e)
    """)
    p = spawn(script, path)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.startswith("ERR ") and "last committed state" in out and "ERR2" in out
    failed_at = int(out.split()[1])
    assert 0 < failed_at < 100
    assert check_prefix(path) == failed_at
    with SketchStore.open(path, readonly=False) as s:  # continue after "freeing space"
        s.put_block(failed_at, failed_at * ROWS, block(failed_at))
        assert not s.has_array("big")
    assert check_prefix(path) == failed_at + 1
