"""Fault tests through the real `grass-index` command.

Every build here is a real ``python -m grass_index build`` subprocess over a tiny task
written to tmp_path (an MLP on synthetic data, 16 batches, ~0.5 s of pass 1 and ~0.5 s of pass 2
plus interpreter start-up). The faults:

* kill -9 at seeded random points of pass 1 and pass 2, then resume: the final index equals an
  uninterrupted build (bit-identical raw sketches, FAISS vectors, top-k ids and scores);
* `info` from another process while a build runs; a second concurrent `build` is refused and
  does not disturb the first;
* `verify` detects a missing / corrupted FAISS file, LMDB-vs-FAISS disagreement, a tampered
  config, a non-finite preconditioner; `verify --repair` fixes the FAISS/preconditioner cases
  from the stored sketches (no gradient is computed);
* version and config safety: an index of another format is refused saying what differs; a
  query model of another shape is refused saying which layer differs and how;
* a file-size limit (RLIMIT_FSIZE, i.e. a full disk) in pass 1 and in pass 2: a clear error, the
  store stays at its last committed state, and a re-run without the limit completes identically.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import grass_index as gi
from grass_index import attribute
from grass_index.attribute import AttributionError, verify_index
from grass_index.cli.main import app
from grass_index.index import VectorIndex
from grass_index.store import SketchStore, StoreError
from grass_index.task import load_task

TASK = textwrap.dedent("""
    import os, time
    import torch, torch.nn.functional as F
    from torch import nn

    N = 256
    SLEEP = float(os.environ.get("FT_SLEEP", "0"))   # seconds per sketched batch
    GATE = os.environ.get("FT_GATE")                 # while this file exists, block ...
    GATE_AFTER = int(os.environ.get("FT_GATE_AFTER", "0"))  # ... after this many batches
    _calls = 0

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 32, generator=g)
        return torch.utils.data.TensorDataset(x, torch.randint(0, 4, (n,), generator=g))

    def train_data():
        return _data(N, 1)

    def query_data():
        return _data(8, 2)

    def loss(model, batch):
        global _calls
        if torch.is_grad_enabled():  # sketched batches and the first-batch capture check
            _calls += 1              # (check_loss runs under no_grad)
            if SLEEP:
                time.sleep(SLEEP)
            # block on batch GATE_AFTER (by content: the first-batch capture check also
            # calls the loss with gradients, so counting calls would gate earlier)
            if GATE and _calls > GATE_AFTER and os.path.exists(GATE) and torch.equal(
                    batch[0][0], train_data()[GATE_AFTER * 16][0]):
                open(GATE + ".waiting", "w").close()
                t0 = time.time()
                while os.path.exists(GATE) and time.time() - t0 < 120:
                    time.sleep(0.01)
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")
""")
N, BS = 256, 16
NB = math.ceil(N / BS)
ARGS = ["--sparsification", "random_mask-32*64", "--projection", "sjlt-1024",
        "--batch-size", str(BS)]
CLI = [sys.executable, "-m", "grass_index"]
runner = CliRunner()


# ----------------------------------------------------------------------------- helpers

def spawn(*args, env=None, **kw):
    e = dict(os.environ, **(env or {}))
    e.pop("GRASS_INDEX_DEBUG", None)
    return subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, **kw)


def build_cmd(task, out):
    return ["build", task, "--out", out, *ARGS]


def run_build(task, out, env=None, **kw):
    p = spawn(*build_cmd(task, out), env=env, **kw)
    so, se = p.communicate(timeout=120)
    return p.returncode, so, se


def one_line(s: str) -> str:
    return " ".join(s.split())


def store_rows(out) -> np.ndarray:
    with SketchStore.open(Path(out) / "sketches", readonly=True) as st:
        return np.concatenate([rows for _, rows in st.iter_blocks()])


def committed(out) -> int:
    """Committed batches as another process sees them (-1: no readable store yet)."""
    try:
        with SketchStore.open(Path(out) / "sketches", readonly=True) as st:
            return st.committed_blocks
    except StoreError:
        return -1


def lock_pid(out):
    try:
        return json.loads((Path(out) / "sketches" / "writer.lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def wait_for(cond, proc, timeout=60.0, what=""):
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return True


def phase(out) -> str:
    """Where a killed build stopped, read from the directory it left."""
    out = Path(out)
    if (out / "config.json").exists():
        return "finished"
    c = committed(out)
    if c < NB:
        return f"pass 1 ({max(c, 0)}/{NB} batches)"
    with SketchStore.open(out / "sketches", readonly=True) as st:
        fisher = st.get_meta("fisher_done", False)
        precond = any(a.startswith("precond/") for a in st.array_names())
    if list(out.glob("index-*.faiss")):
        return "pass 2 (FAISS written, no config yet)"
    if precond:
        return "pass 2 (preconditioner stored)"
    return "pass 2 (Fisher cached)" if fisher else "pass 2 (computing Fisher)"


def assert_prefix_of_reference(out, ref_rows):
    """After any fault: only whole committed batches, each bit-identical to the reference."""
    if committed(out) <= 0:
        return
    with SketchStore.open(Path(out) / "sketches", readonly=True) as st:
        assert st.verify() == []
        seen = np.zeros(N, dtype=int)
        for b, (start, rows) in enumerate(st.iter_blocks()):
            assert start == b * BS
            seen[start:start + len(rows)] += 1
            np.testing.assert_array_equal(rows, ref_rows[start:start + len(rows)])
        assert seen.max(initial=0) <= 1 and st.num_rows == seen.sum()


def assert_same_index(out, ref):
    """The index in `out` equals the uninterrupted reference build, bit for bit."""
    out = Path(out)
    assert verify_index(out)["ok"], verify_index(out)
    np.testing.assert_array_equal(store_rows(out), ref["rows"])
    cfg = json.loads((out / "config.json").read_text())
    strip = lambda c: {k: v for k, v in c.items() if k not in ("created", "config_hash")}  # noqa
    assert strip(cfg) == strip(ref["config"])
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], "stale temp files left"
    t = ref["task"]
    model, items = t.model(), [t.query_data()[i] for i in range(8)]
    a, b = gi.open_index(out), gi.open_index(ref["out"])
    ids = np.arange(N, dtype=np.int64)
    np.testing.assert_array_equal(a.vindex.reconstruct(ids), b.vindex.reconstruct(ids))
    q = b.query_sketches(model, items, t.loss, collate=t.collate)
    assert torch.equal(a.query_sketches(model, items, t.loss, collate=t.collate), q)
    assert a.search(q, 10) == b.search(q, 10)  # same ids, same float scores
    assert a.search(q, 10, opponents=True) == b.search(q, 10, opponents=True)
    assert torch.equal(a.score_sketches(q), b.score_sketches(q))
    a.close()
    b.close()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    p = tmp_path_factory.mktemp("task") / "fault_task.py"
    p.write_text(TASK)
    return p


@pytest.fixture(scope="module")
def ref(task, tmp_path_factory):
    """An uninterrupted CLI build; also measures how long pass 2 takes (for the kill delays)."""
    out = tmp_path_factory.mktemp("ref") / "idx"
    p = spawn(*build_cmd(task, out))
    t_pass2 = t_done = None
    while p.poll() is None and t_done is None:
        if t_pass2 is None and committed(out) == NB:
            t_pass2 = time.monotonic()
        if (out / "config.json").exists():
            t_done = time.monotonic()
        time.sleep(0.005)
    so, se = p.communicate()
    assert p.returncode == 0, se
    pass2 = (t_done or time.monotonic()) - (t_pass2 or time.monotonic())
    return dict(out=out, rows=store_rows(out), task=load_task(str(task)),
                config=json.loads((out / "config.json").read_text()), pass2_s=max(pass2, 0.05))


# ----------------------------------------------------------------------------- kill -9

def test_kill_9_at_random_points_of_both_passes_resumes_identically(task, ref, tmp_path):
    rng = random.Random(20250605)
    env = {"FT_SLEEP": "0.03"}  # pass 1 takes ~0.5 s, so a kill lands between commits too
    plan = ["pass1", "pass1", "pass2", "pass2", "anywhere"]
    # A kill timed into pass 2 can miss it on a loaded machine (the build finishes first);
    # then the whole sequence is tried again in a fresh directory, up to 3 times.
    for attempt in range(3):
        out = tmp_path / f"idx{attempt}"
        seen = _kill_sequence(task, ref, out, plan, rng, env)
        if any(ph.startswith("pass 2") for _, ph in seen):
            break
    print("kills:", seen, "pass 2 of the reference took", round(ref["pass2_s"], 3), "s")
    assert any(ph.startswith("pass 1") for _, ph in seen), seen
    assert any(ph.startswith("pass 2") for _, ph in seen), seen
    # a killed build is reported as unfinished, with its progress
    if not (out / "config.json").exists():
        with pytest.raises(AttributionError, match="not finished"):
            gi.open_index(out)
    rc, so, se = run_build(task, out)
    assert rc == 0, se
    assert_same_index(out, ref)


def _kill_sequence(task, ref, out, plan, rng, env) -> list:
    """Start the build and kill -9 it once per entry of ``plan``; after every kill, nothing
    committed is lost and what is stored is a prefix of the reference. Returns (what, phase)
    per kill."""
    seen = []
    for what in plan:
        before = max(committed(out), 0)
        p = spawn(*build_cmd(task, out), env=env)
        try:
            # the writer holds the store (its pid is in the lock file): the build is under way
            alive = wait_for(lambda: lock_pid(out) == p.pid, p, what="the build to start")
            assert alive, p.communicate()[1]
            if what == "pass1":
                target = rng.randint(before + 1, before + (NB - 2 - before) // 2)
                wait_for(lambda: committed(out) >= target, p, what=f"batch {target}")
                time.sleep(rng.uniform(0, 0.03))
            elif what == "pass2":
                wait_for(lambda: committed(out) >= NB, p, what="pass 1 to end")
                time.sleep(rng.uniform(0, 0.6 * ref["pass2_s"]))
            else:
                time.sleep(rng.uniform(0, 0.5 * ref["pass2_s"]))
            p.send_signal(signal.SIGKILL)
        finally:
            _, se = p.communicate(timeout=60)
        # (a loaded machine may let a build finish before its kill: then it counts as finished)
        assert p.returncode in (0, -signal.SIGKILL), se
        seen.append((what, phase(out) if p.returncode else "finished before the kill"))
        assert committed(out) >= before  # nothing committed is ever lost
        assert_prefix_of_reference(out, ref["rows"])
        assert not (out / "config.json").exists() or seen[-1][1].startswith("finished")
        if seen[-1][1].startswith("finished"):
            break  # nothing left to kill in this directory
    return seen


# ----------------------------------------------------------------------------- concurrency

def test_info_while_building_and_second_writer_refused(task, ref, tmp_path):
    out = tmp_path / "idx"
    gate = tmp_path / "gate"
    gate.write_text("")
    a = spawn(*build_cmd(task, out), env={"FT_GATE": str(gate), "FT_GATE_AFTER": "5"})
    try:
        assert wait_for(lambda: Path(str(gate) + ".waiting").exists(), a, timeout=90,
                        what="the first build to reach its gate"), a.communicate()[1]
        assert committed(out) == 5 and lock_pid(out) == a.pid
        # another process asks for progress and a second build into the same directory
        info = spawn("info", out, "--json")
        second = spawn(*build_cmd(task, out))
        iso, ise = info.communicate(timeout=120)
        sso, sse = second.communicate(timeout=120)
        assert a.poll() is None  # both answered while the first build was running
        assert info.returncode == 0, ise
        d = json.loads(iso)
        assert d["complete"] is False and d["committed_blocks"] == 5 and d["n_blocks"] == NB
        assert second.returncode not in (0, None)
        msg = one_line(sse)
        assert "already being written" in msg and f"pid {a.pid}" in msg, msg
        assert "Traceback" not in sse
        # in-process readers too: progress, and a clear refusal to query an unfinished index
        assert attribute.describe_index(out)["committed_blocks"] == 5
        with pytest.raises(AttributionError, match=r"not finished \(5 of 16 batches"):
            gi.open_index(out)
        assert committed(out) == 5
        assert_prefix_of_reference(out, ref["rows"])
    finally:
        gate.unlink(missing_ok=True)
        so, se = a.communicate(timeout=120)
    assert a.returncode == 0, se
    assert_same_index(out, ref)  # the refused writer did not disturb the first build


# ----------------------------------------------------------------------------- verify

@pytest.fixture()
def broken(ref, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(ref["out"], out)
    (out / "sketches" / "writer.lock").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def ref_faiss(task, tmp_path_factory):
    """The same build with its exact vectors in a FAISS file (flat:faiss)."""
    out = tmp_path_factory.mktemp("ref_faiss") / "idx"
    res = runner.invoke(app, build_cmd(str(task), str(out)) + ["--index", "flat:faiss"])
    assert res.exit_code == 0, res.output
    return dict(out=out, rows=store_rows(out), task=load_task(str(task)),
                config=json.loads((out / "config.json").read_text()))


@pytest.fixture
def broken_faiss(ref_faiss, tmp_path):
    out = tmp_path / "idx_faiss"
    shutil.copytree(ref_faiss["out"], out)
    return out


def cli_verify(out, *extra):
    res = runner.invoke(app, ["verify", str(out), *extra])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output
    return res.exit_code, one_line(res.stdout + "\n" + res.stderr)  # the report, the error


@contextlib.contextmanager
def no_gradients():
    """Repair must work from the stored sketches: any gradient computation fails the test."""
    from grass_index.capture import GradientSketcher

    def boom(*a, **k):
        raise AssertionError("a gradient was computed during repair")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GradientSketcher, "sketch", boom)
        yield


def index_file(out) -> Path:
    return Path(out) / json.loads((Path(out) / "config.json").read_text())["index_file"]


def corrupt_missing(out):
    index_file(out).unlink()
    return "missing"


def corrupt_bytes(out):
    f = index_file(out)
    b = bytearray(f.read_bytes())
    for i in range(len(b) // 3, len(b) // 3 + 64):
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))
    return "unreadable"


def corrupt_truncated(out):
    f = index_file(out)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "unreadable"


def disagree_vectors(out):
    """A well-formed FAISS file whose vectors are not the preconditioned LMDB sketches."""
    f = index_file(out)
    v = VectorIndex.load(f)
    ids = np.arange(N, dtype=np.int64)
    vec = v.reconstruct(ids)
    vec[7] *= 1.5
    w = VectorIndex.create(vec.shape[1], "flat")
    w.add(np.ascontiguousarray(vec), ids)
    w.save(f)
    return "differ from LMDB"


def disagree_count(out):
    f = index_file(out)
    v = VectorIndex.load(f)
    ids = np.arange(N - 3, dtype=np.int64)
    w = VectorIndex.create(int(v.reconstruct(ids[:1]).shape[1]), "flat")
    w.add(np.ascontiguousarray(v.reconstruct(ids)), ids)
    w.save(f)
    return f"holds {N - 3} vectors, expected {N}"


def nan_preconditioner(out):
    cfg = json.loads((Path(out) / "config.json").read_text())
    layer = next(iter(cfg["layout"]))
    kind = cfg["preconditioner"]["forms"][layer]  # each layer's form keeps its own arrays
    array = {"dense": "inverse", "low_rank": "core", "ekfac": "eig"}[kind]
    name = f"precond/{cfg['preconditioner_key']}/{array}/{layer}"
    with SketchStore.open(Path(out) / "sketches", readonly=False) as st:
        inverse = st.get_array(name).copy()
        inverse.flat[3] = np.nan
        st.put_array(name, inverse)
    return "contains NaN/inf"


def saturated_missing(out):
    """The default exact index scans the store: its list of saturated blocks deleted."""
    cfg = json.loads((Path(out) / "config.json").read_text())
    with SketchStore.open(Path(out) / "sketches", readonly=False) as st:
        st.delete_array(f"precond/{cfg['preconditioner_key']}/saturated")
    return "missing or unreadable"


def saturated_forged(out):
    """... or naming a block of a row that is not saturated (id 0 is always sampled)."""
    cfg = json.loads((Path(out) / "config.json").read_text())
    with SketchStore.open(Path(out) / "sketches", readonly=False) as st:
        st.put_array(f"precond/{cfg['preconditioner_key']}/saturated",
                     np.array([[0, 0]], np.int64))
    return "disagrees with the stored rows"


FAISS_FILE = "flat:faiss"  # faults of a FAISS file: an index that has one


@pytest.mark.parametrize("fault, check, index", [
    (corrupt_missing, "faiss vs lmdb", FAISS_FILE), (corrupt_bytes, "faiss vs lmdb", FAISS_FILE),
    (corrupt_truncated, "faiss vs lmdb", FAISS_FILE),
    (disagree_vectors, "faiss vs lmdb", FAISS_FILE),
    (disagree_count, "faiss vs lmdb", FAISS_FILE), (nan_preconditioner, "preconditioner", "flat"),
    (saturated_missing, "exact scan", "flat"), (saturated_forged, "exact scan", "flat")])
def test_verify_detects_and_repair_fixes_without_gradients(fault, check, index, request):
    suffix = "_faiss" if index == FAISS_FILE else ""
    broken, ref = (request.getfixturevalue(f + suffix) for f in ("broken", "ref"))
    assert cli_verify(broken)[0] == 0  # the copy is healthy to begin with
    needle = fault(broken)
    code, msg = cli_verify(broken)
    assert code != 0
    assert f"FAIL {check}: " in msg and needle in msg, msg
    assert "index has problems" in msg and "--repair" in msg
    with no_gradients():
        code, msg = cli_verify(broken, "--repair")
    assert code == 0, msg
    assert "repair:" in msg and "index is consistent" in msg and "FAIL" not in msg, msg
    assert_same_index(broken, ref)


@pytest.mark.parametrize("field, value", [("damping_used", 123.0), ("seed", 7),
                                          ("config_hash", "0" * 16)])
def test_verify_detects_tampered_config(field, value, broken, ref):
    cfile = broken / "config.json"
    cfg = json.loads(cfile.read_text())
    cfg[field] = value
    cfile.write_text(json.dumps(cfg))
    code, msg = cli_verify(broken)
    assert code != 0
    assert "FAIL config:" in msg and "config hash mismatch" in msg, msg
    with pytest.raises(AttributionError, match="config hash mismatch"):
        gi.open_index(broken)
    res = runner.invoke(app, ["query", str(broken), "--example", "0"])
    assert res.exit_code != 0 and "config hash mismatch" in one_line(res.stderr)
    # the store keeps a copy of the config: repair restores it (no gradients needed)
    with no_gradients():
        code, msg = cli_verify(broken, "--repair")
    assert code == 0 and "restored config.json" in msg, msg
    assert json.loads(cfile.read_text())["config_hash"] == ref["config"]["config_hash"]
    assert_same_index(broken, ref)


# ----------------------------------------------------------------------------- versions, configs

def rewrite_config(out, **changes):
    cfile = Path(out) / "config.json"
    cfg = json.loads(cfile.read_text())
    cfg.update(changes)
    cfg["config_hash"] = attribute.config_hash(cfg)  # as that other version would have written
    cfile.write_text(json.dumps(cfg))


@pytest.mark.parametrize("fmt, needles", [
    (attribute.FORMAT_VERSION + 1, ["format 2", "9.9.9", "upgrade grass-index"]),
    (0, ["format 0", "9.9.9", "rebuild"])])
def test_incompatible_format_is_refused_saying_what_differs(fmt, needles, broken):
    rewrite_config(broken, format=fmt, version="9.9.9")
    with pytest.raises(AttributionError) as e:
        gi.open_index(broken)
    msg = str(e.value)
    assert all(n in msg for n in needles + [f"format {attribute.FORMAT_VERSION}",
                                            gi.__version__]), msg
    for cmd in (["info", str(broken)], ["query", str(broken), "--example", "0"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code != 0 and needles[0] in one_line(res.stderr), res.output
    code, msg = cli_verify(broken)
    assert code != 0 and "FAIL config" in msg and needles[0] in msg, msg


def test_other_library_is_refused(broken):
    rewrite_config(broken, library="something-else")
    with pytest.raises(AttributionError, match="not a grass-index config"):
        gi.open_index(broken)


def test_query_with_another_model_shape_is_refused_saying_what_differs(ref):
    idx = gi.open_index(ref["out"])
    t = ref["task"]
    items = [t.query_data()[0]]
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 4))
    with pytest.raises(AttributionError) as e:
        idx.query(wider, items, t.loss)
    msg = str(e.value)
    assert "layer '0'" in msg and "d_out=48" in msg and "d_out=64" in msg, msg
    deeper = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4),
                                 torch.nn.Linear(4, 4))
    with pytest.raises(AttributionError, match=r"layers \['3'\] that index .* does not have"):
        idx.score(deeper, items, lambda m, b: t.loss(m, b))
    # an index whose recorded sketch layout this version would not produce (another version)
    wide = {k: v + 1 for k, v in idx.config["layout"].items()}
    idx.record = gi.IndexConfig(dict(idx.config, layout=wide, dim=sum(wide.values())))
    with pytest.raises(AttributionError, match="builds sketches of layout"):
        idx.query(t.model(), items, t.loss)


def test_rebuild_with_another_compression_config_is_refused(task, ref, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(ref["out"], out)
    res = runner.invoke(app, ["build", str(task), "--out", str(out), "--sparsification",
                              "random_mask-16*32", "--projection", "sjlt-512",
                              "--batch-size", str(BS)])
    msg = one_line(res.stderr)
    assert res.exit_code != 0 and "holds a different build" in msg, res.output
    for field in ("projection", "sparsification", "dim"):
        assert field in msg, msg
    np.testing.assert_array_equal(store_rows(out), ref["rows"])  # untouched


# ----------------------------------------------------------------------------- disk full

def _fsize_limit(nbytes):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    return pre


def test_disk_full_in_both_passes_then_resume_identically(task, ref, tmp_path):
    out = tmp_path / "idx"
    # pass 1: a batch of sketches is ~135 KB, so a 700 KB data file fills after a few batches
    rc, _, se = run_build(task, out, preexec_fn=_fsize_limit(700_000))
    msg = one_line(se)
    assert rc != 0 and "Traceback" not in se
    assert "at its last committed state" in msg and "free disk space" in msg, msg
    c1 = committed(out)
    assert 0 < c1 < NB and f"({c1} blocks, {c1 * BS} rows)" in msg, msg
    assert_prefix_of_reference(out, ref["rows"])
    # pass 2: all sketches fit (2.2 MB), what pass 2 adds to the LMDB file does not (the
    # 256×256 low-rank core of the k=1024 layer, the k=128 layer's Fisher and inverse: ~0.7 MB)
    full = (Path(ref["out"]) / "sketches" / "data.mdb").stat().st_size
    rc, _, se = run_build(task, out, preexec_fn=_fsize_limit(full - (256 << 10)))
    msg = one_line(se)
    assert rc != 0 and "at its last committed state" in msg, msg
    assert committed(out) == NB and phase(out).startswith("pass 2")
    assert_prefix_of_reference(out, ref["rows"])
    with pytest.raises(AttributionError, match="not finished"):
        gi.open_index(out)
    rc, _, se = run_build(task, out)
    assert rc == 0, se
    assert_same_index(out, ref)


def test_resume_removes_temp_files_of_a_killed_save(task, ref, tmp_path):
    """A kill during the FAISS save or the config write leaves temp files (an index file can be
    GBs); the next run, which holds the writer lock, removes them."""
    out = tmp_path / "idx"
    shutil.copytree(ref["out"], out)
    (out / "config.json").unlink()  # killed before the commit point
    stale = [out / f"index-{ref['config']['preconditioner_key']}.faiss.tmp-999-abcd1234",
             out / ".config.json.tmp999"]
    for f in stale:
        f.write_bytes(b"half written")
    res = runner.invoke(app, build_cmd(str(task), str(out)))
    assert res.exit_code == 0, res.output
    assert not any(f.exists() for f in stale)
    assert_same_index(out, ref)
