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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("adv")
    task = write_task(d)
    out = d / "idx"
    res = invoke("build", task, "--out", out, *SMALL)
    assert res.exit_code == 0, res.output
    return task, out


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built index (tests may damage it)."""
    task, out = built
    dst = tmp_path / "idx"
    shutil.copytree(out, dst)
    return task, dst


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
    with pytest.raises(EvalError, match="--task"):
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
    assert v.exit_code != 0 and "FAIL config" in v.stderr
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
        assert "\x1b" not in res.stderr and "\x07" not in res.stderr, res.stderr
        assert "\\x1b" in res.stderr
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
