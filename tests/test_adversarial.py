"""An index directory is data; stale data is never reused; races and repairs that hold; errors
that blame the user's input. Each test reproduces one way a careful user or an attacker got a
wrong or unsafe result, through the public API and the command line."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import grass_index as gi
from _tiny_task import write_task
from grass_index.cli.main import app

runner = CliRunner()
SMALL = ["--sparsification", "random_mask-4*3", "--projection", "sjlt-8", "--batch-size", "8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, *needles):
    """Exit != 0, no traceback, not an internal error, and the message names every needle."""
    assert res.exit_code not in (0, None), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    err = " ".join(res.stderr.split())
    assert "internal error" not in err, err
    for n in needles:
        assert n in err, err
    return err


def rehash(cfg_file: Path, **changes) -> dict:
    """Edit config.json the way an attacker can: change fields and recompute the (unkeyed)
    config hash the library exports."""
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg["config_hash"] = gi.attribute.config_hash(cfg)
    cfg_file.write_text(json.dumps(cfg))
    return cfg


def forge(out: Path, **changes) -> dict:
    """An attacker controls the whole directory: edit config.json and the sketch store's copy
    of it alike, so only the consent rule stands between the index and the user's machine."""
    from grass_index.store import SketchStore

    cfg = rehash(out / "config.json", **changes)
    with SketchStore.open(out / "sketches", readonly=False) as st:
        st.put_meta("config", cfg)
    return cfg


def _built(tmp_path_factory, name: str, *extra):
    d = tmp_path_factory.mktemp(name)
    task = write_task(d)
    out = d / "idx"
    res = invoke("build", task, "--out", out, *SMALL, *extra)
    assert res.exit_code == 0, res.output
    return task, out


def _private_copy(built, tmp_path):
    task, out = built
    dst = tmp_path / "idx"
    shutil.copytree(out, dst)
    return task, dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _built(tmp_path_factory, "adv")


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built index (tests may damage it)."""
    return _private_copy(built, tmp_path)


@pytest.fixture(scope="module")
def built_faiss(tmp_path_factory):
    """An index whose exact vectors are a FAISS file (flat:faiss), not scanned from the store."""
    return _built(tmp_path_factory, "adv_faiss", "--index", "flat:faiss")


@pytest.fixture
def copy_faiss(built_faiss, tmp_path):
    """A private copy of the flat:faiss index."""
    return _private_copy(built_faiss, tmp_path)


PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from torch import nn
import torch
def model(): return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
def train_data(): return [(torch.zeros(6), torch.tensor(0))] * 40
def query_data(): return train_data()
def loss(m, b): return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
def train(subset, seed): return model()
"""


# ------------------------------------------------------------------ code execution (worst)

@pytest.mark.parametrize("where", ["relative", "inside", "absolute"])
@pytest.mark.parametrize("command", ["query", "score", "eval"])
def test_opening_an_index_never_runs_a_planted_task(copy, tmp_path, monkeypatch, where, command):
    """config.json edited (and re-hashed) to name a payload: a relative path next to the index,
    an absolute path inside it, or an absolute path elsewhere with its correct sha256. Without
    --task nothing is imported; the error shows what the index records."""
    _, out = copy
    marker = tmp_path / "ran.txt"
    payload = (out / "evil.py") if where != "absolute" else (tmp_path / "elsewhere.py")
    payload.write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.chdir(out)
    ref = "evil.py" if where == "relative" else str(payload)
    forge(out, task=ref,
           task_sha256=hashlib.sha256(payload.read_bytes()).hexdigest())
    args = {"query": ["query", out, "--example", 0], "score": ["score", out, "--out",
                                                               tmp_path / "s.npy"],
            "eval": ["eval", out, "--subsets", 2, "--seeds", 0]}[command]
    res = invoke(*args)
    assert res.exit_code != 0
    assert not marker.exists(), "the planted task ran"
    err = " ".join(res.stderr.split())
    assert "--task" in err and "never runs code" in err, err
    if where == "inside":
        assert "inside the index directory" in err


def test_python_eval_api_refuses_the_recorded_task_unasked(copy, tmp_path):
    from grass_index.eval.run import EvalError, run_eval

    _, out = copy
    marker = tmp_path / "ran.txt"
    payload = tmp_path / "p.py"
    payload.write_text(PAYLOAD.format(marker=str(marker)))
    forge(out, task=str(payload),
           task_sha256=hashlib.sha256(payload.read_bytes()).hexdigest())
    with pytest.raises(EvalError, match="task='FILE'"):  # Python spelling
        run_eval(out, num_subsets=2, seeds=[0], progress=False)
    assert not marker.exists()


def test_an_edited_config_is_caught_by_the_stores_own_record_and_repaired(copy, tmp_path):
    """The config hash is unkeyed (anyone can re-hash an edit): config.json is also checked
    against the sketch store's record, and `verify --repair` restores it from there."""
    task, out = copy
    good = json.loads((out / "config.json").read_text())
    rehash(out / "config.json", task=str(tmp_path / "x.py"), n_train=30)
    one_line_error(invoke("query", out, "--task", task), "differs in: n_train, task", "--repair")
    v = invoke("verify", out)
    assert v.exit_code != 0 and "FAIL config" in v.stdout
    r = invoke("verify", out, "--repair")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text()) == good
    assert invoke("query", out, "--task", task, "--example", 0).exit_code == 0


def test_query_with_named_task_works_and_a_changed_task_is_flagged(copy, tmp_path):
    task, out = copy
    q = invoke("query", out, "--task", task, "--example", 1, "--json")
    assert q.exit_code == 0, q.output
    assert "differs" not in q.stderr
    changed = tmp_path / "task2.py"
    changed.write_text(task.read_text() + "\n# edited after the build\n")
    q2 = invoke("query", out, "--task", changed, "--example", 1, "--json")
    assert q2.exit_code == 0, q2.output
    assert "differs from the task file the index was built with" in " ".join(q2.stderr.split())
    assert json.loads(q2.stdout)["results"] == json.loads(q.stdout)["results"]


def test_info_records_and_shows_the_task_identity_without_running_it(copy):
    task, out = copy
    doc = json.loads(invoke("info", out, "--json").stdout)["config"]
    assert doc["task"] == str(task.resolve())
    assert doc["task_sha256"] == hashlib.sha256(task.read_bytes()).hexdigest()
    shown = " ".join(invoke("info", out).stdout.split())
    assert str(task.resolve()) in shown and doc["task_sha256"][:12] in shown, shown
    assert "not opened" in shown  # a recorded path is shown, opened only when named


@pytest.mark.parametrize("field,value", [
    ("index_file", "../../etc/passwd"), ("index_files", ["/etc/passwd"]),
    ("index_files", ["..", "x.faiss"]), ("index_file", ".hidden.faiss")])
def test_index_file_names_from_config_are_plain_names_inside_the_directory(copy, field, value):
    task, out = copy
    cfg = json.loads((out / "config.json").read_text())
    changes = {field: value}
    if field == "index_file":
        changes["index_files"] = [value]
    rehash(out / "config.json", **changes)
    res = invoke("query", out, "--task", task, "--example", 0)
    one_line_error(res, "plain file name")
    assert cfg  # the original config is what repair restores
    v = invoke("verify", out, "--repair", "--json")
    assert v.exit_code == 0, v.output
    assert invoke("query", out, "--task", task, "--example", 0).exit_code == 0


def test_terminal_escapes_in_recorded_strings_are_not_printed_raw(tmp_path):
    """A task path holding an OSC/clear-screen sequence: info, query and the build summary show
    it escaped; an edited config naming one is refused without printing it raw."""
    task = write_task(tmp_path, name="t\x1b]0;pwned\x07\x1b[2J.py")
    out = tmp_path / "idx"
    b = invoke("build", task, "--out", out, *SMALL)
    assert b.exit_code == 0, b.output
    for res in (b, invoke("info", out), invoke("query", out, "--example", 0)):
        shown = res.stdout + res.stderr  # results on stdout, the rest on stderr
        assert "\x1b" not in shown and "\x07" not in shown, shown
        assert "\\x1b" in shown
    rehash(out / "config.json", task="\x1b[31m/tmp/t.py")
    for cmd in ("info", "query"):
        res = invoke(cmd, out)
        assert res.exit_code != 0 and "\x1b" not in res.stderr
        one_line_error(res, "verify", "--repair", "task")


@pytest.mark.parametrize("name", ["run[1]", "a[bold]b[/bold]", "x]["])
def test_paths_with_brackets_print_as_themselves(tmp_path, name):
    """rich markup in a path neither crashes the output (after the index is written) nor
    changes the 'next:' command it prints."""
    task = write_task(tmp_path)
    out = tmp_path / name / "idx"
    res = invoke("build", task, "--out", out, *SMALL)
    assert res.exit_code == 0, res.output
    err = " ".join(res.stderr.split())
    assert str(out) in err
    nxt = next(line for line in res.stderr.splitlines() if line.startswith("next:"))
    import shlex
    words = shlex.split(nxt[len("next:"):])
    assert words[:3] == ["grass-index", "query", str(out)], nxt
    assert words[words.index("--task") + 1] == str(task.resolve())
    q = invoke(*words[1:])
    assert q.exit_code == 0, q.output


# ------------------------------------------------------- silently wrong results: data, model

def api_build(out, task_file, *, data=None, model=None, loss=None, **kw):
    t = gi.load_task(str(task_file))
    kw = dict(dict(sparsification="random_mask-4*3", projection="sjlt-8", batch_size=8,
                   progress=False, task=t.ref), **kw)
    return gi.build_index(model or t.model(), data if data is not None else t.train_data(),
                          loss or t.loss, out, **kw)


def changed(data, ids):
    """The training set with examples ``ids`` changed (same length, same first/last)."""
    items = [data[i] for i in range(len(data))]
    for i in ids:
        x, y = items[i]
        items[i] = (x + 1.0, y)
    return items


def test_rebuild_over_changed_examples_refuses_with_the_first_changed_id(built, tmp_path):
    task, _ = built
    out = tmp_path / "idx"
    api_build(out, task)
    data = gi.load_task(str(task)).train_data()
    with pytest.raises(gi.AttributionError, match="training example 10 differs"):
        api_build(out, task, data=changed(data, [10, 25]))
    res = invoke("build", write_task(tmp_path, "t2.py",
                                     poison="x[10] += 1.0 if n == 40 else 0.0"),
                 "--out", out, *SMALL)
    one_line_error(res, "training example 10 differs")
    api_build(out, task)  # the same data still re-runs (re-preconditions) fine


def test_resumed_build_over_changed_data_refuses_before_reusing_sketches(built, tmp_path):
    task, _ = built
    t = gi.load_task(str(task))
    x24 = t.train_data()[24][0]

    def flaky(model, batch):  # killed on batch 3 (examples 24..31): batches 0..2 are committed
        if torch.is_grad_enabled() and torch.equal(batch[0][0], x24):
            raise RuntimeError("killed")
        return t.loss(model, batch)

    out = tmp_path / "idx"
    with pytest.raises(ValueError, match="killed"):
        api_build(out, task, loss=flaky)
    with gi.store.SketchStore.open(out / "sketches", readonly=True) as st:
        assert st.committed_blocks == 3  # examples 0..23: example 17 was sketched
    with pytest.raises(gi.AttributionError, match="training example 17 differs"):
        api_build(out, task, data=changed(t.train_data(), [17, 30]))
    idx = api_build(out, task)  # the original data resumes and finishes
    assert idx.n_train == 40


def test_weights_outside_the_attributed_layers_are_part_of_the_model_fingerprint(built,
                                                                                 tmp_path):
    task, _ = built
    t = gi.load_task(str(task))
    out = tmp_path / "idx"
    api_build(out, task, layers="2.*")
    m = t.model()
    with torch.no_grad():
        m[0].weight[0, 0] += 0.5  # not attributed, but it changes every gradient of layer 2
    with pytest.raises(gi.AttributionError, match="model's weights differ"):
        api_build(out, task, model=m, layers="2.*")
    m2 = t.model()
    m2.register_buffer("temperature", torch.tensor(2.0))  # buffers count too
    with pytest.raises(gi.AttributionError, match="model_hash"):
        api_build(out, task, model=m2, layers="2.*")


# ------------------------------------------------------------------------------ claim race

def test_build_json_is_written_only_under_the_stores_writer_lock(built, tmp_path):
    """Build B into a directory that build A is claiming (A holds the store's lock): B must
    leave A's directory alone — no build.json of B's is ever written there."""
    from grass_index.store import StoreError, writer_lock

    task, _ = built
    out = tmp_path / "idx"
    lock = writer_lock(out / "sketches")  # build A, between taking the lock and build.json
    try:
        with pytest.raises(StoreError, match="already being written"):
            api_build(out, task, seed=1)
        with pytest.MonkeyPatch.context() as mp:  # a worker's claim waits for it, then gives up
            mp.setattr(gi.indexdir.record, "CLAIM_WAIT_S", 0.3)
            with pytest.raises(StoreError, match="already being written"):
                t = gi.load_task(str(task))
                gi.build_shard(t.model(), t.train_data(), t.loss, out, "0/2", gi.BuildOptions(
                    sparsification="random_mask-4*3", projection="sjlt-8", batch_size=8,
                    seed=1), task=t.ref, progress=False)
        assert not (out / "build.json").exists()
    finally:
        lock.release()
    api_build(out, task)
    assert json.loads((out / "build.json").read_text())["seed"] == 0


def test_verify_compares_build_json_with_the_stores_creation_record(copy, tmp_path):
    """A build.json that another build overwrote: verify fails it, reprecondition ignores it
    (it uses the store's own record), repair restores it."""
    task, out = copy
    good = json.loads((out / "build.json").read_text())
    other = dict(good, seed=1, sketch_fingerprint="0" * 16)
    (out / "build.json").write_text(json.dumps(other))
    rep = gi.verify_index(out)
    assert not rep["ok"]
    assert any(c["name"] == "build record" and not c["ok"] for c in rep["checks"]), rep
    t = gi.load_task(str(task))
    before = gi.open_index(out).score(t.model(), t.query_data(), t.loss)
    after = gi.open_index(out).reprecondition().score(t.model(), t.query_data(),  # its damping
                                                       t.loss)
    assert torch.equal(before, after)
    fixed = gi.verify_index(out, repair=True)
    assert fixed["ok"], fixed
    assert json.loads((out / "build.json").read_text()) == good


# ------------------------------------------------------------------------- degenerate damping

@pytest.mark.parametrize("damping", ["1e300", "0", "-1", "nan", "abs:0", "abs:1e300", "inf"])
def test_degenerate_damping_is_refused_at_parse_time(built, tmp_path, damping):
    task, _ = built
    out = tmp_path / "idx"
    res = invoke("build", task, "--out", out, *SMALL, "--damping", damping)
    one_line_error(res, "bad damping", "Accepted")
    assert not out.exists()
    with pytest.raises(gi.AttributionError, match="Accepted"):
        gi.open_index(built[1]).reprecondition(damping=damping)


# ------------------------------------------------------- FAISS file that is not this build's

def faiss_file(out: Path) -> Path:
    return out / json.loads((out / "config.json").read_text())["index_file"]


def test_faiss_file_from_another_build_is_refused_before_answering(copy_faiss, tmp_path):
    task, out = copy_faiss
    other = tmp_path / "other"
    api_build(other, task, seed=3, index="flat:faiss")
    shutil.copy(faiss_file(other), faiss_file(out))
    one_line_error(invoke("query", out, "--task", task), "written for another build",
                   "--repair")
    assert invoke("verify", out, "--repair").exit_code == 0
    assert invoke("query", out, "--task", task).exit_code == 0


@pytest.mark.parametrize("ids,needle", [
    (lambda n: [np.arange(n - 1), [0]], "duplicated ids"),
    (lambda n: [np.arange(1, n + 1)], "outside the training ids")])
def test_faiss_ids_out_of_range_or_duplicated_are_refused(copy_faiss, ids, needle):
    from grass_index.index import VectorIndex

    task, out = copy_faiss
    f = faiss_file(out)
    v = VectorIndex.load(f)
    n = v.ntotal
    vec = v.reconstruct(np.arange(n, dtype=np.int64))
    w = VectorIndex.create(vec.shape[1], "flat")
    start = 0
    for part in ids(n):  # one add() per part: add() itself refuses duplicates within a call
        w.add(np.ascontiguousarray(vec[start:start + len(part)]), np.asarray(part, np.int64))
        start += len(part)
    w.build_key = v.build_key  # the right key: only the ids are wrong
    w.save(f)
    one_line_error(invoke("query", out, "--task", task), needle)


# ------------------------------------------------------------------------------- concurrency

@pytest.mark.parametrize("which", ["copy", "copy_faiss"])
def test_reprecondition_while_a_reader_holds_the_old_config(which, request):
    """A reader opened before a re-precondition (which deletes the old files: the FAISS file,
    the preconditioner's arrays) answers from the new files instead of failing with 'index
    file is missing'."""
    task, out = request.getfixturevalue(which)
    t = gi.load_task(str(task))
    reader = gi.open_index(out)  # holds the old config
    old_key = reader.settings.preconditioner_key
    old_file = None if reader.settings.held_in_store else faiss_file(out)
    fresh = gi.open_index(out).reprecondition(damping=0.5)
    if reader.settings.held_in_store:
        from grass_index.store import SketchStore
        with SketchStore.open(out / "sketches") as st:
            assert not [n for n in st.array_names() if old_key in n]
    else:
        assert not old_file.exists()
    q = t.query_data()
    assert reader.query(t.model(), q, t.loss, k=5) == fresh.query(t.model(), q, t.loss, k=5)
    reader2 = gi.open_index(out)
    gi.open_index(out).reprecondition(damping=0.3)
    assert torch.equal(reader2.score(t.model(), q, t.loss),
                       gi.open_index(out).score(t.model(), q, t.loss))


# ----------------------------------------------------------------------- recovery that works

def test_deleted_build_json_is_restored_by_repair(copy):
    task, out = copy
    good = (out / "build.json").read_text()
    (out / "build.json").unlink()
    assert invoke("verify", out).exit_code != 0
    r = invoke("verify", out, "--repair")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "build.json").read_text()) == json.loads(good)
    assert "restored build.json" in r.stdout


def test_damaged_config_json_is_restored_by_repair(copy):
    task, out = copy
    good = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text((out / "config.json").read_text()[:40])
    one_line_error(invoke("query", out, "--task", task), "corrupted", "--repair")
    r = invoke("verify", out, "--repair")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text()) == good


def _damage_block(out: Path, block: int) -> np.ndarray:
    """Flip bytes of one stored block inside the LMDB file; the block's rows before that."""
    from grass_index.store import SketchStore

    with SketchStore.open(out / "sketches") as st:
        rows = [r for _, r in st.iter_blocks()][block]
    data = out / "sketches" / "data.mdb"
    raw = bytearray(data.read_bytes())
    pat = rows.tobytes()
    at = raw.find(pat)
    assert at >= 0
    while at >= 0:
        raw[at + len(pat) // 2] ^= 0x55
        at = raw.find(pat, at + 1)
    data.write_bytes(bytes(raw))
    return rows


def test_corrupted_sketch_block_is_recomputed_exactly_by_repair_with_the_task(copy):
    from grass_index.store import SketchStore

    task, out = copy
    t = gi.load_task(str(task))
    q = t.query_data()
    before = gi.open_index(out).score(t.model(), q, t.loss)
    rows = _damage_block(out, 2)
    v = invoke("verify", out)
    assert v.exit_code != 0 and "damaged on disk" in v.stdout and "[2]" in v.stdout
    r = invoke("verify", out, "--repair")
    assert r.exit_code != 0 and "--task" in " ".join(r.stdout.split())
    r = invoke("verify", out, "--repair", "--task", task)
    assert r.exit_code == 0, r.output
    assert "recomputed sketch blocks [2]" in " ".join(r.stdout.split())
    with SketchStore.open(out / "sketches") as st:
        assert np.array_equal([r for _, r in st.iter_blocks()][2], rows)
    assert torch.equal(gi.open_index(out).score(t.model(), q, t.loss), before)


# --------------------------------------------------------- errors that blame the user's input

VARLEN = '''
import torch
from torch import nn
def model(): return nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 2))
def train_data(): return [(torch.arange(1 + i % 3), torch.tensor(i % 2)) for i in range(12)]
def loss(m, b):
    x, y = b
    return torch.nn.functional.cross_entropy(m[1](m[0](x)), y, reduction="none")
'''


def test_examples_of_different_lengths_without_collate(tmp_path):
    p = tmp_path / "varlen.py"
    p.write_text(VARLEN)
    res = invoke("build", p, "--out", tmp_path / "o", "--projection", "sjlt-8",
                 "--sparsification", "random_mask-4*2")
    one_line_error(res, "collating examples", "collate(items)")


def test_label_raising_is_blamed_on_the_task(copy, tmp_path):
    task, out = copy
    bad = tmp_path / "t.py"
    bad.write_text(task.read_text() + "\ndef label(item):\n    raise KeyError('no such class')\n")
    one_line_error(invoke("query", out, "--task", bad, "--example", 0), "label(item) raised",
                   "no such class")


@pytest.mark.parametrize("device,needle", [("foo", "unknown device 'foo'"),
                                           ("cuda" if not torch.cuda.is_available() else
                                            "cuda:99", "cuda")])
def test_bad_device_is_one_line(built, tmp_path, device, needle):
    task, _ = built
    res = invoke("build", task, "--out", tmp_path / "o", *SMALL, "--device", device)
    one_line_error(res, needle, "use cpu" if device == "foo" else "device")
    assert not (tmp_path / "o").exists()


def test_training_data_that_shrank_after_the_build(copy, tmp_path):
    task, out = copy
    shrunk = write_task(tmp_path, "small.py", n_train=30)
    shrunk.write_text(shrunk.read_text() + "\ndef label(item):\n    return int(item[1])\n")
    for split in ("query", "train"):  # labels of train ids / a train id as the query
        one_line_error(invoke("query", out, "--task", shrunk, "--split", split, "--example", 0),
                       "30 training examples", "built over 40")


def test_edited_n_train_is_refused(copy):
    task, out = copy
    forge(out, n_train=30)
    for cmd in (["query", out, "--task", task], ["info", out]):
        one_line_error(invoke(*cmd), "differs in: n_train", "--repair")


def test_a_loss_raising_mid_build_names_the_examples_and_the_loss(tmp_path):
    task = write_task(tmp_path)
    src = task.read_text().replace(
        "    x, y = batch\n",
        "    x, y = batch\n    if torch.is_grad_enabled() and float(x[0, 0]) == float(_data(40, 1)"
        "[16][0][0]):\n        raise ValueError('corrupt record')\n", 1)
    task.write_text(src)
    res = invoke("build", task, "--out", tmp_path / "o", *SMALL)
    one_line_error(res, "the loss raised ValueError on training examples 16..23",
                   "corrupt record", "resumes")


def test_int32_input_is_reported_as_a_dtype_error(copy, tmp_path):
    task, out = copy
    np.savez(tmp_path / "q.npz", x=np.zeros((2, 6), np.int32), y=np.zeros(2, np.int64))
    one_line_error(invoke("query", out, "--task", task, "--input", tmp_path / "q.npz"),
                   "expected dtype float32, got int32")


REPRECONDITION_LOOP = """
import sys, grass_index as gi
for i in range(int(sys.argv[2])):
    gi.open_index(sys.argv[1]).reprecondition(damping=(0.3, 0.5)[i % 2])
"""


@pytest.mark.slow
def test_queries_racing_repreconditions_in_another_process_all_answer(copy, tmp_path):
    """The reported race: another process re-preconditions (deleting the old files) again and
    again while this one opens the index and queries it; every query answers."""
    import os
    import subprocess
    import sys

    task, out = copy
    t = gi.load_task(str(task))
    model, q = t.model(), t.query_data()
    script = tmp_path / "loop.py"
    script.write_text(REPRECONDITION_LOOP)
    proc = subprocess.Popen([sys.executable, str(script), str(out), "6"],
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    answered = 0
    try:
        while proc.poll() is None or answered < 3:  # ~20 queries race 6 repreconditions
            idx = gi.open_index(out)
            sk = idx.query_sketches(model, q, t.loss)  # time passes between open and search
            assert len(idx.search(sk, 5)) == len(q)
            answered += 1
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0
    assert answered >= 3


def test_rerunning_the_build_recomputes_a_damaged_block(copy):
    from grass_index.store import SketchStore

    task, out = copy
    t = gi.load_task(str(task))
    before = gi.open_index(out).score(t.model(), t.query_data(), t.loss)
    rows = _damage_block(out, 4)
    one_line_error(invoke("score", out, "--task", task, "--out", out.parent / "s.npy"),
                   "failed its checksum", "--repair --task")
    res = invoke("build", task, "--out", out, *SMALL)
    assert res.exit_code == 0, res.output
    with SketchStore.open(out / "sketches") as st:
        assert np.array_equal([r for _, r in st.iter_blocks()][4], rows)
    assert torch.equal(gi.open_index(out).score(t.model(), t.query_data(), t.loss), before)


def test_only_tasks_shipped_with_grass_index_run_without_being_named(tmp_path):
    """The bundled example (module or its own file) is installed code; anything else a
    directory records - lookalike paths, other attributes of the bundled module, files
    elsewhere, hf-lm references (their paths are data) - is refused unless named."""
    from grass_index.task import TaskError, default_task_ref, is_builtin_task, task_for_index

    assert is_builtin_task("grass_index.examples.digits")
    assert is_builtin_task(default_task_ref())
    assert not is_builtin_task('hf-lm:{"model": "m", "data": "d"}')
    lookalike = tmp_path / "grass_index" / "examples" / "digits.py"
    lookalike.parent.mkdir(parents=True)
    lookalike.write_text("raise SystemExit('planted')\n")
    for ref in (str(lookalike), "grass_index.examples.digits:os", "os:system",
                "grass_index.examples", None, ""):
        assert not is_builtin_task(ref), ref
        with pytest.raises(TaskError, match="task='FILE'"):  # Python spelling
            task_for_index(None, recorded=ref, sha256=None, index_dir=tmp_path)


# ------------------------------------------- files: only regular files, never through a symlink
# (issue 20 §2; the rule and its helpers: grass_index/fileio.py)

PRECIOUS = b"the user's own file\n"


def victim(tmp_path: Path, name: str = "precious.txt") -> Path:
    """A file of the user's, outside the index, that no command may touch."""
    p = tmp_path / "user" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(PRECIOUS)
    return p


def entry_point(command: str, task: Path, out: Path) -> list:
    return {"info": ["info", out], "verify": ["verify", out],
            "repair": ["verify", out, "--repair"],
            "build": ["build", task, "--out", out, *SMALL],
            "query": ["query", out, "--task", task, "--example", 1]}[command]


@pytest.mark.parametrize("command", ["info", "verify", "repair", "build", "query"])
@pytest.mark.parametrize("planted", ["lock.mdb", "writer.lock", "data.mdb"])
def test_a_symlink_in_the_store_is_refused_and_its_target_never_written(copy, tmp_path, command,
                                                                        planted):
    """LMDB writes lock.mdb on every open (read-only too) and a writer truncates writer.lock:
    through a planted symlink that was the user's file. Now every entry point refuses, naming
    the file, and the target is byte-for-byte unchanged."""
    task, out = copy
    target = victim(tmp_path)
    link = out / "sketches" / planted
    if planted == "data.mdb":  # the real data moved aside: the link is the whole store
        target.write_bytes(link.read_bytes())
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    before = target.read_bytes()
    res = invoke(*entry_point(command, task, out))
    assert target.read_bytes() == before, f"{command} wrote through sketches/{planted}"
    if planted == "writer.lock" and command in ("info", "query"):  # readers never lock
        return
    assert res.exit_code != 0, res.output
    assert f"sketches/{planted}" in " ".join((res.stdout + res.stderr).split()), res.output


def test_a_hard_linked_lock_file_is_refused(copy, tmp_path):
    """A hard link is the same inode: LMDB's lock data would land in the user's file."""
    _, out = copy
    target = victim(tmp_path)
    (out / "sketches" / "lock.mdb").unlink(missing_ok=True)
    try:
        (out / "sketches" / "lock.mdb").hardlink_to(target)
    except OSError:
        pytest.skip("hard links across these directories are not possible here")
    res = invoke("info", out)
    one_line_error(res, "lock.mdb", "hard link")
    assert target.read_bytes() == PRECIOUS


@pytest.mark.parametrize("command", ["verify", "repair", "build"])
def test_a_symlinked_arrays_directory_is_reported_and_nothing_in_it_deleted(copy, tmp_path,
                                                                           command):
    """Orphan clean-up used to delete every file of the directory `sketches/arrays` pointed at
    (and `verify` said "consistent"): it is reported, and clean-up deletes only regular files
    it wrote, by name, in a real directory."""
    task, out = copy
    user = tmp_path / "user"
    user.mkdir()
    mine = {"notes.txt": b"keep", "0123456789abcdef.npy": b"keep too", ".hidden": b"and me"}
    for name, data in mine.items():
        (user / name).write_bytes(data)
    shutil.rmtree(out / "sketches" / "arrays", ignore_errors=True)
    (out / "sketches" / "arrays").symlink_to(user, target_is_directory=True)
    res = invoke(*entry_point(command, task, out))
    assert {p.name: p.read_bytes() for p in user.iterdir()} == mine
    assert res.exit_code != 0, res.output
    assert "sketches/arrays" in " ".join((res.stdout + res.stderr).split())


def _forge_array_header(out: Path, name: str, file_name: str) -> None:
    """Point a stored array's header at ``file_name`` (what an attacker editing data.mdb does)."""
    from grass_index.store import SketchStore

    with SketchStore.open(out / "sketches", readonly=False) as st:
        h = st._h
        header = h.read(lambda txn: json.loads(bytes(txn.get(name.encode(), db=h.dbs["arrays"]))))
        header.update(file=file_name, crc=0, crcs=[])
        h.write(lambda txn: txn.put(name.encode(), json.dumps(header).encode(),
                                    db=h.dbs["arrays"]), state=lambda: "forged")


def _precond_array(out: Path) -> str:
    from grass_index.store import SketchStore

    with SketchStore.open(out / "sketches") as st:
        return next(n for n in st.array_names() if n.startswith("precond/"))


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_an_array_header_naming_a_file_outside_the_store_is_refused_and_never_deleted(
        copy, tmp_path, how):
    """A header whose `file` is absolute made a re-precondition delete that file; `../` made
    pass 2 read outside the directory. Names read from the store are checked at every use."""
    task, out = copy
    target = victim(tmp_path, "victim.npy")
    if how == "absolute":  # the old preconditioner's header: a refit deletes its old file
        name, ref = _precond_array(out), str(target)
    else:  # the cached Fisher sums, which a refit reads
        name, ref = "fisher/0", "../../../user/victim.npy"
    _forge_array_header(out, name, ref)
    rep = gi.verify_index(out)
    assert not rep["ok"]
    assert any("not an array file of this store" in c["detail"] for c in rep["checks"]), rep
    if how == "absolute":
        gi.open_index(out).reprecondition(damping=0.5)  # drops the forged header
        assert gi.verify_index(out)["ok"]
    else:
        with pytest.raises(gi.GrassIndexError, match="not an array file of this store"):
            gi.open_index(out).reprecondition(damping=0.5)
    assert target.read_bytes() == PRECIOUS


class FifoWatch:
    """Make a FIFO at ``path``; if anything opens it for reading (which blocks until a writer
    comes), record that and release the reader (open the write end and close it: EOF), so a
    regression fails the test instead of hanging the suite."""

    def __init__(self, path: Path):
        import os
        import threading
        import time

        path.unlink(missing_ok=True)
        os.mkfifo(path)
        self.hung, self._stop = False, threading.Event()

        def watch():
            while not self._stop.is_set():
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader
                except OSError:
                    time.sleep(0.02)
                    continue
                import stat

                self.hung = stat.S_ISFIFO(os.fstat(fd).st_mode)  # not a file renamed over it
                os.close(fd)
                if not self.hung:
                    return

        self._t = threading.Thread(target=watch, daemon=True)
        self._t.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)


@pytest.mark.parametrize("name", ["build.json", "config.json", "sketches/data.mdb",
                                  "sketches/lock.mdb", "sketches/writer.lock"])
@pytest.mark.parametrize("command", ["info", "verify", "repair", "query"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(copy, command, name):
    """A FIFO where build.json was hung `verify` and `serve` forever; every file the library
    reads is opened with O_NONBLOCK|O_NOFOLLOW and refused unless regular."""
    task, out = copy
    with FifoWatch(out / name) as w:
        res = invoke(*entry_point(command, task, out))
    assert not w.hung, f"{command} opened the FIFO {name} for reading"
    if command in ("info", "query") and name in ("build.json", "sketches/writer.lock"):
        return  # files these readers never open
    if command == "repair" and name == "build.json":  # repair replaces it from the store
        assert res.exit_code == 0 and (out / name).is_file(), res.output
        return
    assert res.exit_code != 0, res.output
    assert name in " ".join((res.stdout + res.stderr).split())


@pytest.mark.parametrize("name", ["build.json", "config.json"])
def test_serve_refuses_a_fifo_or_symlink_at_start(copy, tmp_path, name):
    from grass_index.serve import ServeError, create_app

    task, out = copy
    with FifoWatch(out / name) as w:
        with pytest.raises(gi.GrassIndexError, match=name):
            create_app(out, task=str(task))
    assert not w.hung
    (out / name).unlink()
    (out / name).symlink_to(victim(tmp_path))
    with pytest.raises(gi.GrassIndexError, match=name):
        create_app(out, task=str(task))
    assert ServeError  # the class serve raises for what verify finds


def test_a_write_names_the_file_asked_for_never_its_temp_file(copy, tmp_path):
    """`score --out DIR` said `.tmp.tmp26333`: the one atomic-write helper names the target."""
    task, out = copy
    d = tmp_path / "scores"
    d.mkdir()
    err = one_line_error(invoke("score", out, "--task", task, "--out", d), str(d))
    assert ".tmp" not in err and "tmp-" not in err, err
    assert list(d.iterdir()) == [] and not [p for p in tmp_path.iterdir() if "tmp-" in p.name]


def test_atomic_writes_never_follow_a_planted_temp_name_or_target_symlink(tmp_path):
    """The temp file is created with O_EXCL|O_NOFOLLOW; a symlink at the target is replaced
    (rename), its target untouched."""
    from grass_index.fileio import write_json

    target = victim(tmp_path)
    link = tmp_path / "config.json"
    link.symlink_to(target)
    write_json(link, {"a": 1})
    assert target.read_bytes() == PRECIOUS
    assert not link.is_symlink() and json.loads(link.read_text()) == {"a": 1}


def test_clean_up_deletes_only_regular_files_it_wrote(copy, tmp_path):
    """Old FAISS variants and stale temp files are removed by name; a symlink named like one,
    and anything not ours, stay (the symlink is reported by verify)."""
    task, out = copy
    target = victim(tmp_path)
    planted = out / "index-0123456789abcdef.faiss"
    planted.symlink_to(target)
    stranger = out / "index-notes.txt"
    stranger.write_bytes(b"mine")
    gi.open_index(out).reprecondition(damping=0.5)
    assert planted.is_symlink() and target.read_bytes() == PRECIOUS
    assert stranger.read_bytes() == b"mine"
    rep = gi.verify_index(out)
    assert not rep["ok"] and "index-0123456789abcdef.faiss is a symlink" in str(rep["checks"])


# --------------------------------------------- recorded paths are data, like recorded tasks
# (issue 20 §3: an hf-lm index's model and data paths are opened only when named again)

LM_LINES = [f"line {i}: the quick brown fox number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def lm_built(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(d / "model")
    (d / "corpus.txt").write_text("\n".join(LM_LINES) + "\n")
    out = d / "idx"
    res = invoke("build", "--hf-model", d / "model", "--data", d / "corpus.txt", "--out", out,
                 "--max-length", 16, "--sparsification", "random_mask-8*8", "--projection",
                 "sjlt-16", "--batch-size", 4)
    assert res.exit_code == 0, res.output
    return d / "model", d / "corpus.txt", out


@pytest.fixture
def lm_copy(lm_built, tmp_path):
    model, data, out = lm_built
    shutil.copytree(out, tmp_path / "idx")
    return model, data, tmp_path / "idx"


def _forge_lm_data(out: Path, secret: Path) -> None:
    """config.json and the store's copy both edited to read another file, hash recomputed."""
    cfg = json.loads((out / "config.json").read_text())
    args = json.loads(cfg["task"][len("hf-lm:"):])
    args["data"] = str(secret)
    forge(out, task="hf-lm:" + json.dumps(args, sort_keys=True), task_sha256=None)


def test_an_hf_lm_index_never_opens_its_recorded_paths_unnamed(lm_copy, tmp_path):
    """The attack: the directory points the data path at another file; `verify` passed and
    `serve` returned that file's lines. Now query/serve refuse until the paths are named."""
    from grass_index.serve import create_app

    model, data, out = lm_copy
    secret = tmp_path / "secret.txt"
    secret.write_text("\n".join(f"SECRET {i} do not show this" for i in range(8)) + "\n")
    _forge_lm_data(out, secret)
    one_line_error(invoke("query", out, "--text", "the fox"), "--hf-model DIR --data FILE")
    with pytest.raises(gi.GrassIndexError, match=r"task=grass_index\.tasks\.hf_lm\.named_ref"
                       r"\(DIR, FILE\)") as e:
        create_app(out)
    assert "--hf-model" not in str(e.value)
    # naming the real files: they are not what the (forged) record says
    named = invoke("query", out, "--hf-model", model, "--data", data, "--text", "the fox")
    one_line_error(named, "is not the data path the index was built with", str(secret))
    info = invoke("info", out)
    assert str(secret) in " ".join(info.stdout.split())  # shown, not read


def test_an_hf_lm_index_runs_with_the_named_paths_and_refuses_changed_data(lm_copy, tmp_path):
    from fastapi.testclient import TestClient

    from grass_index.serve import create_app
    from grass_index.tasks.hf_lm import named_ref

    model, data, out = lm_copy
    q = invoke("query", out, "--hf-model", model, "--data", data, "--text", LM_LINES[2],
               "--top-k", 2, "--json")
    assert q.exit_code == 0, q.output
    assert json.loads(q.stdout)["results"][0]["proponents"][0]["train_id"] == 2
    with TestClient(create_app(out, task=named_ref(model, data))) as c:
        r = c.get("/api/examples", params=dict(split="train"))
        assert r.status_code == 200, r.text
        assert "line 3: the quic" in r.text and "SECRET" not in r.text
    one_line_error(invoke("query", out, "--data", data, "--text", "x"), "--hf-model")
    moved = tmp_path / "moved.txt"
    moved.write_bytes(data.read_bytes())
    one_line_error(invoke("query", out, "--hf-model", model, "--data", moved, "--text", "x"),
                   "is not the data path the index was built with")
    original = data.read_bytes()
    try:  # same path, same number of lines, one line edited
        data.write_text("\n".join(LM_LINES[:-1] + ["an edited line of text"]) + "\n")
        one_line_error(invoke("query", out, "--hf-model", model, "--data", data, "--text", "x"),
                       "CHANGED since the index was built")
    finally:
        data.write_bytes(original)


@pytest.mark.parametrize("name", ["config.json", "build.json", "INDEX", "sketches",
                                  "sketches/data.mdb"])
def test_every_file_of_the_directory_moved_behind_a_symlink_is_refused(request, tmp_path, name):
    """The adversarial pass over the whole layout: each file (or the store directory) moved
    out and replaced by a symlink to it — same bytes — is refused by `verify` (reported) and by
    the command that uses it, naming it; nothing is written through the link. (INDEX: the
    FAISS file of a flat:faiss index; the default exact index has none.)"""
    task, out = request.getfixturevalue("copy_faiss" if name == "INDEX" else "copy")
    if name == "INDEX":
        name = faiss_file(out).name
    real = out / name
    moved = tmp_path / "elsewhere" / Path(name).name
    moved.parent.mkdir()
    shutil.move(str(real), moved)
    real.symlink_to(moved, target_is_directory=moved.is_dir())
    snapshot = {p: p.read_bytes() for p in [moved, *moved.rglob("*")] if p.is_file()}
    rep = invoke("verify", out)
    assert rep.exit_code != 0 and name in " ".join(rep.stdout.split() + rep.stderr.split())
    if name != "build.json":  # a query never reads build.json
        one_line_error(invoke("query", out, "--task", task, "--example", 1), name)
    assert {p: p.read_bytes() for p in snapshot} == snapshot


@pytest.mark.parametrize("command", ["worker", "merge"])
def test_a_symlinked_shards_directory_is_refused(built, tmp_path, command):
    """`build --worker` creates a store in shards/I-of-N and `merge` reads (then removes)
    them: through a symlinked shards/ that was a directory of the user's."""
    task, _ = built
    user = tmp_path / "user"
    (user / "0-of-2").mkdir(parents=True)
    (user / "0-of-2" / "notes.txt").write_bytes(b"keep")
    out = tmp_path / "idx"
    out.mkdir()
    (out / "shards").symlink_to(user, target_is_directory=True)
    args = (["build", task, "--out", out, "--worker", "0/2", *SMALL] if command == "worker"
            else ["merge", out])
    one_line_error(invoke(*args), "shards")
    assert sorted(p.name for p in user.rglob("*")) == ["0-of-2", "notes.txt"]


def test_a_hard_linked_record_is_replaced_by_repair_never_written_through(copy, tmp_path):
    """Records are replaced by rename, so a hard link to the user's file is never written."""
    _, out = copy
    target = victim(tmp_path)
    (out / "build.json").unlink()
    try:
        (out / "build.json").hardlink_to(target)
    except OSError:
        pytest.skip("hard links are not possible here")
    res = invoke("verify", out, "--repair")
    assert res.exit_code == 0, res.output
    assert target.read_bytes() == PRECIOUS
    assert json.loads((out / "build.json").read_text())["n_train"] > 0


def test_a_fifo_in_place_of_the_faiss_file_is_named_as_such(copy_faiss):
    task, out = copy_faiss
    with FifoWatch(faiss_file(out)) as w:
        one_line_error(invoke("query", out, "--task", task, "--example", 1), "is a FIFO")
        rep = invoke("verify", out, "--repair")  # reported; never opened, never replaced
    assert not w.hung and rep.exit_code != 0
    assert "is a FIFO" in " ".join((rep.stdout + rep.stderr).split())


# ------------------------------------------------ forged records: typed, checked once (house)

class TestForgedRecords:
    """config.json / build.json values forged together with the store's copy of the config
    (issue 20 §5) are refused where the record is read, with one line naming the file and the
    field: never an internal error deep in a query, never a wrong number."""

    @staticmethod
    def _bad_recall(cfg):
        return dict(cfg["index"], recall=dict(cfg["index"]["recall"], recall="abc"))

    @pytest.mark.parametrize("field,value,needle", [
        ("checkpoints", 10**9, "'checkpoints'"),   # changed self-influence while verify passed
        ("index", "bad recall", "recall must be a number in [0, 1]"),
        ("tune", {"junk": 1}, "'tune'"),
        ("damping_used", {"0": "x"}, "'damping_used'"),
        ("preconditioner_key", "../../etc/x", "'preconditioner_key'"),
        ("hessian", "gauss-newton", "'hessian'"),
        ("damping", "lots", "'damping'"),
    ])
    def test_every_command_refuses_a_forged_field(self, copy, field, value, needle):
        task, out = copy
        cfg = json.loads((out / "config.json").read_text())
        forge(out, **{field: self._bad_recall(cfg) if value == "bad recall" else value})
        for cmd in (["info", out], ["query", out, "--task", task, "--example", 0],
                    ["self-influence", out, "--task", task]):
            one_line_error(invoke(*cmd), "config.json", needle)
        rep = gi.verify_index(out)
        assert not rep["ok"] and needle in rep["checks"][0]["detail"], rep

    @pytest.mark.parametrize("changes,needle", [
        (dict(n_train=float("nan")), "field 'n_train' must be an integer >= 1, got nan"),
        (dict(n_train=-1), "field 'n_train' must be an integer >= 1, got -1"),
        (dict(n_train=10**18), "field 'n_blocks'"),
        (dict(n_train=40.0), "field 'n_train' must be an integer"),
        (dict(layout=[1, 2]), "field 'layout' must be a non-empty object"),
        (dict(layout={"0": 0, "2": 8}), "field 'layout' must map layer names to positive"),
        (dict(dim=17), "field 'dim' (17) is not the sum"),
        (dict(batch_size=True), "field 'batch_size'"),
        (dict(sparsification="zz-1"), "field 'sparsification' is not a compression spec"),
        (dict(index_kind="hnsw"), "field 'index_kind'"),
        (dict(index_files=["index-000000000000.faiss"]), "'index_file(s)' must name the FAISS"),
        (dict(index_file="index-000000000000.faiss"), "'index_file(s)' must name the FAISS"),
        (dict(layer_dims=[{"name": "0"}]), "field 'layer_dims'"),
    ])
    def test_the_typed_record_checks_types_ranges_and_agreement(self, copy, changes, needle):
        """Fields the store's creation record also holds are caught by it first (see
        test_edited_n_train_is_refused); the record itself refuses them too."""
        task, out = copy
        cfg = json.loads((out / "config.json").read_text())
        with pytest.raises(gi.AttributionError) as e:
            gi.IndexConfig({**cfg, **changes}, str(out / "config.json"))
        msg = str(e.value)
        assert needle in msg and "config.json" in msg and "\n" not in msg, msg

    def test_missing_required_fields_are_named(self, copy):
        task, out = copy
        cfg = json.loads((out / "config.json").read_text())
        for key in ("layout", "n_train", "preconditioner_key", "index"):
            with pytest.raises(gi.AttributionError, match=f"field '{key}' is missing"):
                gi.IndexConfig({k: v for k, v in cfg.items() if k != key})
        # the FAISS file may be left out only where the record says the store holds the index
        faiss_less = dict(cfg, index={k: v for k, v in cfg["index"].items() if k != "held"})
        with pytest.raises(gi.AttributionError, match=r"'index_file\(s\)' must name"):
            gi.IndexConfig(faiss_less)

    def test_a_faiss_index_record_names_its_first_file_first(self, copy_faiss):
        task, out = copy_faiss
        cfg = json.loads((out / "config.json").read_text())
        with pytest.raises(gi.AttributionError, match="'index_file' is not the first"):
            gi.IndexConfig(dict(cfg, index_files=[f"index-{cfg['preconditioner_key']}-x.faiss"]
                                ), str(out / "config.json"))

    def test_a_forged_build_json_of_an_unfinished_build(self, copy):
        task, out = copy
        (out / "config.json").unlink()
        build = json.loads((out / "build.json").read_text())
        (out / "build.json").write_text(json.dumps(dict(build, n_train=float("nan"))))
        one_line_error(invoke("info", out), "build.json", "field 'n_train'")
        (out / "build.json").write_text(json.dumps(dict(build, layout="x")))
        one_line_error(invoke("info", out), "build.json", "field 'layout'")

    def test_the_record_is_the_json_on_disk_byte_for_byte(self, copy):
        """Typed access adds no key and changes no value: the hash over it is the written one."""
        task, out = copy
        text = (out / "config.json").read_text()
        rec = gi.open_index(out).record
        assert dict(rec.raw) == json.loads(text)
        assert gi.attribute.config_hash(dict(rec.raw)) == rec.config_hash
        assert (rec.n_train, rec.batch_size, rec.checkpoints, rec.index_files) == (
            40, 8, 1, ())  # the default exact index is scanned from the store: no file
        with pytest.raises(AttributeError):
            rec.n_train = 3  # frozen

    def test_every_file_an_index_directory_holds_is_declared_in_indexdir_files(self, copy):
        from grass_index.indexdir import files

        task, out = copy
        idx = gi.open_index(out)
        t = gi.load_task(str(task))
        q = t.query_data()
        idx.query(t.model(), [q[0], q[1]], t.loss, k=3, normalize="cosine")
        key = idx.record.preconditioner_key
        declared = (files.OUR_FILES | {files.MASK_FILE, files.cosine_file_name(key)}
                    | set(files.index_file_names(key, 1)))
        assert (out / files.cosine_file_name(key)).is_file()
        assert {p.name for p in out.iterdir()} <= declared


# ============================================================================================
# Real data is never refused (issue 20 §1, "realdata"): a saturated example is stored as 0,
# an index that can say nothing is refused, a damping pass 2 refuses leaves pass 1 re-usable.
# ============================================================================================

SATURATED = """
import torch, torch.nn.functional as F
from torch import nn

SATURATED = 8   # training examples 0..7 sit at a logit margin of 90: loss 0, gradient ~1e-38

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

def margins(m, x):
    top = m(x).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]

def _data(n, seed, saturated):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    m = model()
    with torch.no_grad():
        for _ in range(20):  # a ReLU net without bias is 1-homogeneous: scale up to margin 90
            x[:saturated] *= (90.0 / margins(m, x[:saturated]))[:, None]
        y[:saturated] = m(x[:saturated]).argmax(1)
    return torch.utils.data.TensorDataset(x, y)

def train_data():
    return _data(40, 1, SATURATED)

def query_data():
    return _data(6, 2, 0)

def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none") * SCALE
"""


def saturated_task(directory: Path, scale: str = "1.0") -> Path:
    p = directory / f"saturated_{scale.replace('.', '_').replace('-', 'm')}.py"
    p.write_text(SATURATED.replace("SCALE", scale))
    return p


def test_the_saturated_task_is_saturated(tmp_path):
    """The fixture's premise: margins >= 90, loss exactly 0, gradients float32 subnormals."""
    t = gi.load_task(str(saturated_task(tmp_path)))
    m, (x, y) = t.model(), t.train_data().tensors
    top = m(x[:8]).topk(2, dim=1).values
    assert ((top[:, 0] - top[:, 1]) >= 89.9).all()
    losses = t.loss(m, (x, y))
    assert (losses[:8] == 0).all() and (losses[8:] > 0).all()
    losses[0].backward()
    biggest = max(p.grad.abs().max().item() for p in m.parameters())
    assert 0 < biggest < 1e-36


@pytest.mark.parametrize("hessian", ["eFIM", "identity"])
def test_a_saturated_classifier_builds_and_its_saturated_examples_score_zero(tmp_path,
                                                                             hessian):
    task = saturated_task(tmp_path)
    out = tmp_path / "idx"
    res = invoke("build", task, "--out", out, *SMALL, "--hessian", hessian)
    assert res.exit_code == 0, res.output
    res = invoke("query", out, "--task", task, "--example", 0, "-k", 40, "--json")
    assert res.exit_code == 0, res.output
    t = gi.load_task(str(task))
    scores = gi.open_index(out).score(t.model(), t.query_data(), t.loss)
    assert scores.shape == (6, 40) and torch.isfinite(scores).all()
    assert (scores[:, :8] == 0).all()          # no influence: the right answer
    assert (scores[:, 8:] != 0).double().mean() > 0.9  # everyone else ranks as usual


def test_saturated_examples_store_the_same_with_flush_to_zero_on_and_off(tmp_path):
    task = saturated_task(tmp_path)
    t = gi.load_task(str(task))
    scores = {}
    for ftz in (False, True):
        old = torch.set_flush_denormal(ftz)
        assert old is True or ftz is False  # the CPU supports it (x86 / arm64)
        try:
            api_build(tmp_path / f"ftz{ftz}", task)
            scores[ftz] = gi.open_index(tmp_path / f"ftz{ftz}").score(
                t.model(), t.query_data(), t.loss)
        finally:
            torch.set_flush_denormal(False)
    assert (scores[False][:, :8] == 0).all()
    assert torch.equal(scores[False], scores[True])


@pytest.mark.parametrize("hessian", ["eFIM", "identity"])
def test_an_index_whose_every_gradient_is_zero_is_refused(tmp_path, hessian):
    task = write_task(tmp_path, reduction="none")
    task.write_text(task.read_text().replace("reduction='none')", "reduction='none') * 0.0"))
    out = tmp_path / "idx"
    res = invoke("build", task, "--out", out, *SMALL, "--hessian", hessian)
    one_line_error(res, "gradient is zero", "every selected layer", "not written", "--check")
    assert not (out / "config.json").exists()
    with pytest.raises(gi.AttributionError, match=r"check_capture\(") as e:
        api_build(tmp_path / "api", task, hessian=hessian)
    assert "--check" not in str(e.value)


def test_a_damping_that_destroys_signals_is_refused_and_only_pass_2_reruns(tmp_path):
    """Gradients ~1e-10 (well within float32) times abs:1e30's inverse ~1e-30 underflow: the
    damping destroyed them. The message names the exact command; it re-runs only pass 2."""
    task = saturated_task(tmp_path, "1e-9")
    out = tmp_path / "idx"
    res = invoke("build", task, "--out", out, *SMALL, "--damping", "abs:1e30")
    err = one_line_error(res, "underflow float32", "damping is too large",
                         f"--out {out} --damping 0.3", "only pass 2 runs again")
    assert "Pass 1's sketches are kept" in err
    one_line_error(invoke("query", out, "--task", task), "pass 1 is complete",
                   "only pass 2 runs again", "--damping 0.3")
    from grass_index.store import SketchStore
    with SketchStore.open(out / "sketches", readonly=True) as st:
        before = [rows.copy() for _, rows in st.iter_blocks()]
    res = invoke("build", task, "--out", out, *SMALL, "--damping", "0.3")
    assert res.exit_code == 0, res.output
    with SketchStore.open(out / "sketches", readonly=True) as st:
        assert all(np.array_equal(a, b) for a, (_, b) in zip(before, st.iter_blocks()))
    fresh = tmp_path / "fresh"
    assert invoke("build", task, "--out", fresh, *SMALL, "--damping", "0.3").exit_code == 0
    t = gi.load_task(str(task))
    assert torch.equal(gi.open_index(out).score(t.model(), t.query_data(), t.loss),
                       gi.open_index(fresh).score(t.model(), t.query_data(), t.loss))


def test_a_refused_damping_is_spelled_for_python_callers(tmp_path):
    task = saturated_task(tmp_path, "1e-9")
    with pytest.raises(gi.AttributionError) as e:
        api_build(tmp_path / "idx", task, damping="abs:1e30")
    msg = str(e.value)
    assert "build_index(..., damping='0.3')" in msg and "hessian='identity'" in msg, msg
    assert "--damping" not in msg and "grass-index build" not in msg, msg
    idx = api_build(tmp_path / "idx", task, damping=0.3)  # pass 2 again, as the message says
    assert idx.n_train == 40
    with pytest.raises(gi.AttributionError, match=r"reprecondition\(damping='0.3'\)|"
                                                  r"keeps its current preconditioner"):
        idx.reprecondition(damping="abs:1e30")
    assert gi.open_index(tmp_path / "idx").config["damping"] == "0.3"  # still serving



# --- issue 20 §5 ("realdata"): merge refuses shards sketched from different training data ----

def relabelled(data, ids):
    """The training set with the labels of examples ``ids`` changed (x, length, first and
    last example unchanged: build.json's cheap data hash cannot tell)."""
    items = [data[i] for i in range(len(data))]
    for i in ids:
        x, y = items[i]
        items[i] = (x, (y + 1) % 3)
    return items


def test_merge_refuses_workers_that_read_different_training_data(built, tmp_path):
    task, _ = built
    t = gi.load_task(str(task))
    out = tmp_path / "idx"
    opts = gi.BuildOptions(sparsification="random_mask-4*3", projection="sjlt-8", batch_size=8)
    gi.build_shard(t.model(), t.train_data(), t.loss, out, "0/2", opts, task=t.ref,
                   progress=False)
    gi.build_shard(t.model(), relabelled(t.train_data(), [5, 17]), t.loss, out, "1/2", opts,
                   task=t.ref, progress=False)
    with pytest.raises(gi.AttributionError, match=r"shard 1-of-2 read other training data than "
                                                  r"shard 0-of-2 \(examples 5, 17 differ\)"):
        gi.merge_shards(out, progress=False)
    one_line_error(invoke("merge", out), "read other training data", "examples 5, 17",
                   "re-run them with the right data")
    assert not (out / "config.json").exists()
    # a worker resumed over other data is refused too, before it sketches anything
    with pytest.raises(gi.AttributionError, match=r"training data changed since this worker "
                                                  r"started \(examples 5, 17 differ\)"):
        gi.build_shard(t.model(), t.train_data(), t.loss, out, "1/2", opts, task=t.ref,
                       progress=False)
    # the fix the message names: re-run the wrong worker with the right data
    shutil.rmtree(out / "shards" / "1-of-2")
    gi.build_shard(t.model(), t.train_data(), t.loss, out, "1/2", opts, task=t.ref,
                   progress=False)
    assert gi.merge_shards(out, progress=False).n_train == 40
